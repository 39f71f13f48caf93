"""Keras or PyTorch for the same fine-tune: keras_lora against peft, step time.

python -m benchmarks.peft_comparison                  # full run: 2.5 to 4 minutes here
python -m benchmarks.peft_comparison --json results.json
python -m benchmarks.peft_comparison --tiny           # tiny shapes: checks it runs

A random, seeded Llama-shaped Hugging Face checkpoint is written to a temporary
directory. Each setup loads it in a child process of its own (a process's Keras
backend is fixed when Keras is first imported), puts LoRA (rank 8, alpha 16) on
the query and value projections, trains a few warm-up steps on one fixed batch,
then waits for orders on stdin. The parent drives the children one at a time,
round after round, so that load changing during the run reaches every setup
alike, and takes each setup's ratio to peft round by round.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from subprocess import PIPE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # `python benchmarks/peft_comparison.py`
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import measure  # noqa: E402

SEED = 1234
RANK, ALPHA, LEARNING_RATE = 8, 16, 1e-4
# Short turns (2 steps) keep the steps of one round close in time, so that
# the per-round ratios pair steps that ran under the same load.
ROUNDS, TINY_ROUNDS, STEPS_PER_ROUND, WARMUP = 30, 2, 2, 3
# Every adapter's B starts at zero, so each setup's first loss is the base
# model's, computed by another framework on the same weights.
LOSS_TOLERANCE = 1e-3
# The packages the comparison needs beyond Keras and keras_lora, by import name.
REQUIRES = ("torch", "transformers", "peft", "keras_hub")
DEFAULT = "tf-xla"
TARGET = 1.00


@dataclasses.dataclass(frozen=True)
class Shape:
    """The Llama model and the batch, in Hugging Face's terms."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocabulary: int
    batch: int
    tokens: int


# Layers, hidden, heads (as many key/value heads), intermediate, vocabulary,
# batch, tokens. Intermediate 1376: Llama's 8/3 x hidden, rounded up to 32.
FULL = Shape(4, 512, 8, 1376, 8192, 4, 128)
TINY = Shape(1, 32, 4, 64, 128, 2, 16)


@dataclasses.dataclass(frozen=True)
class Setup:
    """One way to run the fine-tune: peft (`backend` None) or a Keras backend,
    with keras_lora's adapters or Keras' built-in LoRA (`builtin`)."""

    name: str
    backend: str | None
    jit_compile: bool
    description: str
    builtin: bool = False


SETUPS = {
    setup.name: setup
    for setup in (
        Setup("peft", None, False, "transformers + peft, eager PyTorch"),
        Setup("tf", "tensorflow", False, "keras_lora, TensorFlow"),
        Setup("tf-xla", "tensorflow", True, "keras_lora, TensorFlow, XLA"),
        # The same step with Keras' own LoRA: what of a gap to peft is the
        # adapter's, and what the stack's (Keras, keras-hub, XLA).
        Setup(
            "keras-xla",
            "tensorflow",
            True,
            "Keras' built-in LoRA (keras-hub enable_lora), TensorFlow, XLA",
            builtin=True,
        ),
        Setup("jax", "jax", True, "keras_lora, JAX (jit)"),
        Setup("torch", "torch", False, "keras_lora, Keras on PyTorch, eager"),
    )
}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    shape = TINY if args.tiny else FULL
    if args.child:
        return _serve(SETUPS[args.child], args.checkpoint, shape)
    missing = [name for name in REQUIRES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"peft comparison skipped: {', '.join(missing)} not installed")
        return 0
    rounds = args.rounds or (TINY_ROUNDS if args.tiny else ROUNDS)
    started, load = time.perf_counter(), os.getloadavg()
    times, ready = _compare(shape, rounds, args.tiny)
    rows = _rows(times, ready)
    elapsed, load_after = time.perf_counter() - started, os.getloadavg()
    versions = {}
    for reply in ready.values():
        versions.update(reply["versions"])
    print(
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} -> {load_after[0]:.2f}, "
        f"{elapsed:.0f} s, {rounds} rounds x {STEPS_PER_ROUND} steps; {versions}"
    )
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as file:
            run = {"shape": dataclasses.asdict(shape), "rounds": rounds, "rows": rows}
            machine = {"seconds": elapsed, "load": [load, load_after]}
            json.dump({**run, **machine, "versions": versions}, file, indent=1)
    return 0


def _compare(shape: Shape, rounds: int, tiny: bool) -> tuple[dict, dict]:
    """Per setup, seconds per step in each round, and the child's "ready" reply."""
    names = [name for name in SETUPS if name != "jax" or importlib.util.find_spec(name)]
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = os.path.join(directory, "llama")
        write_checkpoint(shape, checkpoint)
        # The children load and compile side by side; only timing is one at a time.
        children = {name: Child(name, checkpoint, tiny, directory) for name in names}
        try:
            ready = {name: child.ready() for name, child in children.items()}
            _check(ready, shape)
            return _interleave(children, rounds), ready
        finally:
            for child in children.values():
                child.close()


def write_checkpoint(shape: Shape, path: str) -> None:
    """Saves a random (seeded) float32 `LlamaForCausalLM` of `shape` to `path`."""
    import torch
    import transformers

    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(
        vocab_size=shape.vocabulary,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max(shape.tokens, 512),
    )
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)


def batch(shape: Shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed batch: token ids, padding mask (all ones), next-token targets."""
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, shape.vocabulary, (shape.batch, shape.tokens + 1))
    mask = np.ones((shape.batch, shape.tokens), "int32")
    return ids[:, :-1].astype("int32"), mask, ids[:, 1:].astype("int32")


class Child:
    """One setup's process, driven by lines: "run K" -> seconds per step."""

    def __init__(self, name: str, checkpoint: str, tiny: bool, directory: str):
        self.name = name
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        if SETUPS[name].backend:
            env["KERAS_BACKEND"] = SETUPS[name].backend
        tiny_flag = ["--tiny"] if tiny else []
        module = ["-m", "benchmarks.peft_comparison", "--child", name]
        command = [sys.executable, *module, "--checkpoint", checkpoint, *tiny_flag]
        self._log_path = os.path.join(directory, f"{name}.log")
        log = self._log = open(self._log_path, "w")  # noqa: SIM115 (see close())
        self._process = subprocess.Popen(
            command, cwd=ROOT, env=env, text=True, stdin=PIPE, stdout=PIPE, stderr=log
        )

    def ready(self) -> dict:
        """Waits for warm-up; returns the child's trainable count, first loss."""
        return json.loads(self._reply())

    def run(self, steps: int) -> float:
        """Seconds per step of `steps` training steps, timed in the child."""
        self._process.stdin.write(f"run {steps}\n")
        self._process.stdin.flush()
        return float(self._reply())

    def close(self) -> None:
        self._process.stdin.close()  # end of input: the child returns
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()

    def _reply(self) -> str:
        line = self._process.stdout.readline()
        if not line:
            with open(self._log_path) as log:
                tail = log.read()[-3000:]
            raise RuntimeError(
                f"The '{self.name}' setup's process stopped before replying "
                f"(exit status {self._process.wait()}). Its log ends:\n{tail}"
            )
        return line


def _interleave(children: dict[str, Child], rounds: int) -> dict[str, list[float]]:
    """Seconds per step, per setup and round; one child runs at a time, and
    the order rotates each round so that no setup always follows the same one."""
    names = list(children)
    times = {name: [] for name in names}
    for index in range(rounds):
        turn = index % len(names)
        for name in names[turn:] + names[:turn]:
            times[name].append(children[name].run(STEPS_PER_ROUND))
    return times


def _check(ready: dict[str, dict], shape: Shape) -> None:
    """Every setup starts from the same loss, and each that factorises as peft
    does trains the same adapters (Keras' built-in LoRA factorises an
    EinsumDense kernel per output axis, so it trains more for the same rank)."""
    expected = shape.layers * 2 * RANK * (shape.hidden + shape.hidden)
    reference = ready["peft"]["first_loss"]
    for name, reply in ready.items():
        if not SETUPS[name].builtin and reply["trainable"] != expected:
            raise RuntimeError(
                f"The '{name}' setup trains {reply['trainable']:,} parameters; the "
                f"query and value adapters have {expected:,}. Received: {reply}"
            )
        if not abs(reply["first_loss"] - reference) <= LOSS_TOLERANCE:
            raise RuntimeError(
                f"The '{name}' setup's first loss differs from peft's "
                f"({reference:.6f}) by more than {LOSS_TOLERANCE}: the models are "
                f"not the same. Received: first_loss={reply['first_loss']:.6f}"
            )


def _rows(times: dict[str, list[float]], ready: dict[str, dict]) -> list[dict]:
    rows = []
    for name, seconds in times.items():
        ratios = [a / b for a, b in zip(seconds, times["peft"], strict=True)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios
        ratio = measure.paired_ratio(seconds, times["peft"])
        rows.append(
            {
                **dataclasses.asdict(SETUPS[name]),
                **ready[name],
                "ms": 1000 * measure.median(seconds),
                "ratio": ratio,
                "ratio_quartiles": [quartiles[0], quartiles[-1]],
                "seconds": seconds,
                "default": name == DEFAULT,
                "passed": ratio <= TARGET if name == DEFAULT else None,
            }
        )
    return rows


def _table(rows: list[dict]) -> str:
    """Setup, median ms per step, paired ratio to peft (and the quartiles of
    the per-round ratios), the target, on the default path's row only."""
    lines = ["setup       ms/step  /peft  quartiles    target         description"]
    for row in rows:
        low, high = row["ratio_quartiles"]
        target, description = "", row["description"]
        if row["default"]:
            target = f"<= {TARGET:.2f} " + ("PASS" if row["passed"] else "MISS")
            description += " (the default path)"
        lines.append(
            f"{row['name']:<10} {row['ms']:>8.1f} {row['ratio']:>6.3f} "
            f"{low:>5.3f}-{high:<6.3f} {target:<14} {description}"
        )
    return "\n".join(lines)


def _serve(setup: Setup, checkpoint: str, shape: Shape) -> int:
    """The child: build, warm up, reply "ready", then run steps when told."""
    # Replies go to a private copy of stdout; whatever the libraries print
    # goes to stderr (the log), where it cannot be taken for a reply.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    build = _peft_step if setup.backend is None else _keras_step
    step, trainable, versions = build(setup, checkpoint, shape)
    first_loss = step()
    for _ in range(WARMUP - 1):
        step()
    if setup.backend in (None, "torch"):
        versions["torch threads"] = sys.modules["torch"].get_num_threads()
    reply = {"trainable": trainable, "first_loss": first_loss, "versions": versions}
    print(json.dumps(reply), file=replies)
    for line in sys.stdin:
        steps = int(line.split()[1])
        start = time.perf_counter()
        for _ in range(steps):
            step()
        print((time.perf_counter() - start) / steps, file=replies)
    return 0


def _peft_step(setup, checkpoint, shape):
    """transformers + peft, one eager step: forward, loss, backward, Adam."""
    import peft
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32
    )
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    model = peft.get_peft_model(model, config)
    model.train()
    trainable = [tensor for tensor in model.parameters() if tensor.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE)
    ids, mask, targets = (torch.from_numpy(array).long() for array in batch(shape))

    def step():
        # No KV cache: training does not decode (Keras' train step builds none).
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, shape.vocabulary), targets.reshape(-1)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    versions = _versions("torch", "transformers", "peft")
    return step, sum(tensor.numel() for tensor in trainable), versions


def _keras_step(setup, checkpoint, shape):
    """keras-hub's Llama from the same checkpoint, LoRA on query and value
    (keras_lora's, or Keras' built-in), `train_on_batch`."""
    # Imported here: the child's KERAS_BACKEND must be set before Keras loads.
    import keras
    import keras_hub

    import keras_lora

    backbone = keras_hub.models.Backbone.from_preset(checkpoint)
    model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    if setup.builtin:
        # Its scale is 1 (alpha = rank), keras_lora's 2: one multiply apart.
        backbone.enable_lora(RANK, target_layer_names=["query", "value"])
    else:
        model = keras_lora.convert(
            model, rank=RANK, alpha=ALPHA, targets=["query", "value"]
        )
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # keras-hub compiled the task with an accuracy metric when it was built,
        # and `None` would keep it; peft's step computes the loss only.
        weighted_metrics=[],
        jit_compile=setup.jit_compile,
    )
    if model.jit_compile != setup.jit_compile:
        raise RuntimeError(
            f"Keras did not keep jit_compile={setup.jit_compile} for the "
            f"'{setup.name}' setup. Received: jit_compile={model.jit_compile}"
        )
    ids, mask, targets = (keras.ops.convert_to_tensor(array) for array in batch(shape))
    inputs = {"token_ids": ids, "padding_mask": mask}

    def step():
        return float(model.train_on_batch(inputs, targets))

    trainable = sum(math.prod(variable.shape) for variable in model.trainable_weights)
    # Keras' backend names are the libraries' import names.
    versions = _versions("keras", setup.backend, "keras_hub", "keras_lora")
    return step, trainable, versions


def _versions(*modules):
    return {name: sys.modules[name].__version__ for name in modules}


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peft_comparison",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--rounds", type=int, help=f"timed rounds (default {ROUNDS})")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the test)")
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    # A child process's own arguments.
    parser.add_argument("--child", choices=list(SETUPS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be positive. Received: {args.rounds}")
    return args


if __name__ == "__main__":
    sys.exit(main())
