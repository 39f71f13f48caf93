"""Hugging Face peft adapters: run one in keras-hub, train it, hand it back.

Everything is offline, on the tiny Llama checkpoint in the repository's test
fixtures (`tests/fixtures/hf/llama/`: a transformers `LlamaForCausalLM`
directory, peft adapters trained on it, and the logits transformers and peft
computed). keras-hub loads the transformers checkpoint
(`Backbone.from_preset` on its directory), `keras_lora.load_peft_adapter` puts
peft's `qv` adapter (rank 4 on `q_proj` and `v_proj`) onto it, and the logits
are compared with peft's. The adapter is then fine-tuned in Keras on a made-up
next-token task (count up: each token is the previous one plus 1), saved with
`keras_lora.save_peft_adapter` as a peft adapter directory, and loaded again
into a fresh keras-hub model. Where torch, transformers and peft are
installed, stock peft loads the saved directory onto the transformers model
(`PeftModel.from_pretrained`), and its logits are compared with Keras'.

Run: `python examples/peft_adapters.py` (add `--smoke` for 3 epochs instead of
100; either run takes about 30 s on 2 CPU cores, mostly imports and XLA
compilation. `--out DIR` keeps the peft adapter directory; by default it goes
to a temporary folder deleted when the example ends).
"""

import argparse
import os
import pathlib
import tempfile
import warnings

import keras
import keras_hub
import numpy as np

import keras_lora

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
MODEL_DIR = FIXTURES / "llama" / "model"
VOCABULARY = 64  # the fixture model's
SEQUENCE = 16


def causal_lm() -> keras.Model:
    """The keras-hub causal LM of the transformers checkpoint, on token ids."""
    backbone = keras_hub.models.Backbone.from_preset(str(MODEL_DIR))
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)


def logits(lm, inputs) -> np.ndarray:
    return keras.ops.convert_to_numpy(lm(inputs))


def loss(lm, x, y) -> float:
    """The mean next-token cross-entropy, as `CausalLM`'s default loss."""
    losses = keras.losses.sparse_categorical_crossentropy(y, lm(x), from_logits=True)
    return float(keras.ops.convert_to_numpy(keras.ops.mean(losses)))


def count_up_task(num_sequences: int):
    """Sequences that count up from a random token, modulo the vocabulary; the
    label of each token is the next one."""
    starts = np.random.default_rng(0).integers(0, VOCABULARY, (num_sequences, 1))
    tokens = (starts + np.arange(SEQUENCE + 1)) % VOCABULARY
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((num_sequences, SEQUENCE), "int32"),
    }
    return x, tokens[:, 1:].astype("int32")


def peft_logits(adapter_dir, inputs) -> np.ndarray:
    """Stock peft's logits with the adapter in `adapter_dir` on the
    transformers model of the fixture checkpoint."""
    import peft
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, attn_implementation="eager"
    )
    with warnings.catch_warnings():
        # peft 0.21 calls an API transformers 5 deprecates; nothing to act on here.
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.PeftModel.from_pretrained(hf_model, adapter_dir).eval()
    with torch.no_grad():
        output = model(
            input_ids=torch.tensor(inputs["token_ids"], dtype=torch.long),
            attention_mask=torch.tensor(inputs["padding_mask"], dtype=torch.long),
        )
    return output.logits.numpy()


def main(out: str, smoke: bool = False, temporary: bool = False) -> None:
    keras.utils.set_random_seed(0)
    epochs = 3 if smoke else 100
    with np.load(FIXTURES / "llama" / "logits.npz") as arrays:
        reference = dict(arrays)
    inputs = {
        "token_ids": reference["token_ids"],
        "padding_mask": reference["padding_mask"],
    }

    lm = keras_lora.load_peft_adapter(causal_lm(), FIXTURES / "llama" / "qv")
    gap = np.abs(logits(lm, inputs) - reference["qv"]).max()
    print(
        f"1. Loaded the transformers checkpoint {MODEL_DIR.relative_to(ROOT)} into "
        f"a keras-hub {type(lm).__name__}, and peft's 'qv' adapter onto it"
    )
    keras_lora.print_trainable_parameters(lm)
    print(f"   max logit difference vs peft's (logits.npz): {gap:.2e}")

    x, y = count_up_task(num_sequences=32)
    # XLA: Keras' "auto" leaves it off for TensorFlow on a CPU.
    jit_compile = True if keras.backend.backend() == "tensorflow" else "auto"
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=jit_compile)
    before = loss(lm, x, y)
    # keras-hub batches the arrays with tf.data, which `shuffle` does not reach.
    lm.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    after = loss(lm, x, y)
    print(f"2. Fine-tune the adapter on counting up, {epochs} epochs")
    print(f"   loss before {before:.3f}, after {after:.3f}")

    adapter_dir = os.path.join(out, "peft_adapter")
    keras_lora.save_peft_adapter(
        lm, adapter_dir, base_model_name_or_path=str(MODEL_DIR)
    )
    files = sorted(os.listdir(adapter_dir))
    print(f"3. Saved it as a peft adapter: {adapter_dir} {files}")
    expected = logits(lm, inputs)
    reloaded = keras_lora.load_peft_adapter(causal_lm(), adapter_dir)
    gap = np.abs(logits(reloaded, inputs) - expected).max()
    print("4. Loaded it into a fresh keras-hub model")
    print(f"   max logit difference vs the trained model: {gap:.2e}")

    try:
        gap = np.abs(peft_logits(adapter_dir, inputs) - expected).max()
    except ImportError as error:
        print(
            f"5. Stock peft check skipped: needs torch, transformers and peft ({error})"
        )
    else:
        print("5. Loaded it with stock peft onto the transformers model")
        print(f"   max logit difference vs Keras: {gap:.2e}")
    if temporary:
        print(
            f"   {out} is a temporary folder, deleted as this example ends; "
            "run it with --out DIR to keep the peft adapter"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3 epochs, not 100")
    parser.add_argument(
        "--out",
        help="where to write the peft adapter directory "
        "(default: a temporary folder, deleted when the example ends)",
    )
    args = parser.parse_args()
    if args.out:
        main(args.out, args.smoke)
    else:
        with tempfile.TemporaryDirectory() as out:
            main(out, args.smoke, temporary=True)
