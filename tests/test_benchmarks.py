"""The benchmark suite runs and reports every row (not how fast anything is)."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from backends import tensorflow_benchmarks

ROOT = pathlib.Path(__file__).resolve().parents[1]
HUB = importlib.util.find_spec("keras_hub") is not None
# The harness is the same for every workload. The causal-LM one (a keras-hub
# Gemma, about two minutes of tracing at tiny size) is left out of the run and
# checked on its own below.
WORKLOADS = ("dense", "conv", "embedding", "attention")
SETUPS = ("full", "builtin", "keras_lora")


def run_benchmark(tmp_path, module, *arguments):
    """Runs `python -m module *arguments --json ...` on the TensorFlow backend;
    returns the finished process and the rows it wrote."""
    results = tmp_path / "results.json"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, "-m", module, *arguments, "--json", results],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(results.read_text())["rows"]


@tensorflow_benchmarks
def test_quick_tiny_run_reports_every_row(tmp_path):
    workloads = ",".join(WORKLOADS)
    run, rows = run_benchmark(
        tmp_path, "benchmarks", "--quick", "--tiny", "--workloads", workloads
    )
    reported = {(row["section"], row["workload"], row["variant"]) for row in rows}
    expected = {
        (section, workload, setup)
        for section in ("training", "xla", "memory")
        for workload in WORKLOADS
        for setup in SETUPS
    } | {
        ("inference", workload, mode)
        for workload in WORKLOADS
        for mode in ("base", "base-copy", "unmerged", "merged")
    }
    assert expected <= reported
    convert_rows = [row for row in rows if row["section"] == "convert"]
    assert {row["variant"] for row in convert_rows} == {"time", "peak RSS"}
    assert len(convert_rows) == 3
    assert all(row["value"] > 0 for row in rows if row["section"] != "memory")
    assert all(
        row["detail"] == "jit_compile=True" for row in rows if row["section"] == "xla"
    )
    held = [row for row in rows if row["target"]]
    # Per workload: step, XLA, memory, 2 inference; and 2 for convert().
    targets = len(WORKLOADS) * 5 + 2
    assert len(held) == targets
    assert all(row["passed"] in (True, False) for row in held)
    table = run.stdout.split("# all results")[1]
    for section, workload, variant in expected:
        line = rf"^{section} +{workload} +{variant} "
        assert re.search(line, table, re.MULTILINE), (section, workload, variant)
    assert re.search(rf"^targets: \d+/{targets} PASS", table, re.MULTILINE)


@tensorflow_benchmarks
@pytest.mark.skipif(not HUB, reason="the causal-LM workload needs keras-hub")
def test_causal_lm_lora_setups_train_the_same_layers():
    # keras-hub's `backbone.enable_lora(8)` and keras_lora's targets
    # ["query", "value"] adapt the same projections, nothing else trains, and
    # every setup takes a training step.
    from benchmarks.setups import compile_model, make_model
    from benchmarks.training import batch_tensors
    from benchmarks.workloads import causal_lm

    workload = causal_lm(tiny=True)
    x, y = batch_tensors(workload)
    for setup in SETUPS:
        model = make_model(workload, setup)
        compile_model(model, workload, jit_compile=False)
        assert np.all(np.isfinite(model.train_on_batch(x, y)))
        if setup == "full":
            continue
        # ".../query/lora_kernel_a" (Keras), ".../query/default/lora_a" (ours)
        adapted = {
            re.sub(r"(/default)?/lora_(kernel_)?[ab]$", "", variable.path)
            for variable in model.trainable_weights
        }
        assert sorted(adapted) == [
            "decoder_block_0/attention/query",
            "decoder_block_0/attention/value",
        ], setup


# Checked by name, not imported: importing peft here would load torch into
# this TensorFlow test process (8 s) for nothing; the run's children import it.
PEFT = all(importlib.util.find_spec(name) for name in ("torch", "transformers", "peft"))


@tensorflow_benchmarks
@pytest.mark.skipif(not HUB, reason="the peft comparison needs keras-hub")
@pytest.mark.skipif(not PEFT, reason="the peft comparison needs torch and peft")
def test_peft_comparison_tiny_run_reports_every_setup(tmp_path):
    run, rows = run_benchmark(tmp_path, "benchmarks.peft_comparison", "--tiny")
    expected = ["peft", "tf", "tf-xla", "keras-xla", "torch"]
    if importlib.util.find_spec("jax"):
        expected.insert(4, "jax")
    assert [row["name"] for row in rows] == expected
    # 1 layer x (query, value) x rank 8 x (32 in + 32 out), as peft; Keras'
    # own LoRA factorises per output axis: A (32, 4, 8) and B (8, 8) per layer.
    assert {row["name"]: row["trainable"] for row in rows} == {
        name: 2176 if name == "keras-xla" else 1024 for name in expected
    }
    for row in rows:
        assert np.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert np.isfinite(row["ms"]) and row["ms"] > 0, row
        assert re.search(rf"^{row['name']} +\d+\.\d +\d\.\d+ ", run.stdout, re.M)
    assert [row["name"] for row in rows if row["default"]] == ["tf-xla"]
    assert rows[expected.index("tf-xla")]["passed"] in (True, False)
