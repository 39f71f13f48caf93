"""Every example runs on its smoke settings and prints sane key numbers."""

import csv
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from backends import saved_model_export

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_example(name: str, tmp_path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--smoke", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def numbers_after(label: str, output: str) -> list[float]:
    return [float(value) for value in re.findall(rf"{label} (\S+)", output)]


def accuracies(output: str) -> list[tuple[float, float]]:
    pairs = re.findall(r"before (\d\.\d+), after (\d\.\d+)", output)
    return [(float(before), float(after)) for before, after in pairs]


@saved_model_export
def test_quickstart_keeps_its_files_under_out(tmp_path):
    output = run_example("quickstart.py", tmp_path, "--out", str(tmp_path))
    assert "trainable params:" in output
    assert "LoraConv2D" in output
    [(before, after)] = accuracies(output)
    assert 0 <= before <= 1 and 0 <= after <= 1
    gaps = numbers_after("max output difference", output)
    assert len(gaps) == 2  # the merged model, the reloaded SavedModel
    assert max(gaps) < 1e-4
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "serving" / "saved_model.pb").is_file()
    assert "temporary" not in output


@saved_model_export
def test_quickstart_says_its_default_folder_is_temporary(tmp_path):
    output = run_example("quickstart.py", tmp_path)
    [folder] = re.findall(r"^   (\S+) is a temporary folder, deleted as", output, re.M)
    assert f"Saved the adapter to {os.path.join(folder, 'adapter')} " in output
    assert "--out DIR to keep" in output
    assert not os.path.exists(folder)
    assert list(tmp_path.iterdir()) == []  # nothing in the working directory


def test_transformer_text(tmp_path):
    output = run_example("transformer_text.py", tmp_path)
    assert "Pre-train on 768 sequences of 8 tokens, 3 epochs" in output
    paths = re.findall(r"^   (\S+/\S+)$", output, re.M)
    assert paths == ["attention/query", "attention/value"]
    assert "trainable params:" in output
    assert "LoraEinsumDense" in output
    [(before, after)] = accuracies(output)
    # Even the smoke run shows the adapters learning the new task (0.52 -> 0.90
    # when written; chance is 0.5).
    assert before < 0.6 and after > 0.75


def test_multi_adapter(tmp_path):
    output = run_example("multi_adapter.py", tmp_path, "--out", str(tmp_path))
    assert len(accuracies(output)) == 2
    for name in ("task_a", "task_b"):
        assert (tmp_path / name / "adapter.safetensors").is_file()
    gaps = numbers_after("max output difference", output)
    assert len(gaps) == 2
    assert max(gaps) < 1e-5


def test_lora_vs_full(tmp_path):
    out = tmp_path / "out"
    output = run_example("lora_vs_full.py", tmp_path, "--out", str(out))
    [rates] = re.findall(r"each at learning rates ([\d., ]+)$", output, re.M)
    rates = [float(rate) for rate in rates.split(", ")]
    assert len(rates) == 2  # the smoke run tries the ends of the grid
    # The validation table: an accuracy per rate, then the best rate.
    best = {}
    for method, values in re.findall(
        r"^   (LoRA|full)((?:\s+\d\.\d+)+)$", output, re.M
    ):
        *by_rate, best[method] = map(float, values.split())
        assert len(by_rate) == len(rates)
        assert best[method] == rates[by_rate.index(max(by_rate))]  # ties: the smaller
    assert set(best) == {"LoRA", "full"}
    # The results table: each method at its best rate.
    result_row = (
        r"^   (LoRA|full)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$"
    )
    columns = ("rate", "trainable", "accuracy", "step_ms", "peak_mb")
    results = {
        method: dict(
            zip(columns, (float(v.replace(",", "")) for v in values), strict=True)
        )
        for method, *values in re.findall(result_row, output, re.M)
    }
    assert {method: result["rate"] for method, result in results.items()} == best
    assert 0 < results["LoRA"]["trainable"] < results["full"]["trainable"]
    for result in results.values():
        assert 0 <= result["accuracy"] <= 1
        assert result["step_ms"] > 0 and result["peak_mb"] > 0
    # The curves, under --out only: from epoch 0, at the best rate. Epoch 0 is
    # the pre-trained base for both (LoRA starts at B = 0).
    assert list(tmp_path.iterdir()) == [out]
    assert (out / "lora_vs_full.png").read_bytes().startswith(b"\x89PNG")
    with open(out / "lora_vs_full.csv") as f:
        curves = list(csv.DictReader(f))
    for method, result in results.items():
        points = [row for row in curves if row["method"] == method]
        assert [int(point["epoch"]) for point in points] == [0, 1, 2]
        assert {float(point["learning_rate"]) for point in points} == {result["rate"]}
        last = float(points[-1]["accuracy"])
        assert last == pytest.approx(result["accuracy"], abs=1e-3)
    lora, full = (
        [float(row["loss"]), float(row["accuracy"])]
        for row in curves
        if row["epoch"] == "0"
    )
    assert lora == pytest.approx(full, abs=1e-4)


def test_causal_lm(tmp_path):
    pytest.importorskip("keras_hub")
    output = run_example("causal_lm.py", tmp_path, "--out", str(tmp_path))
    assert "trainable params:" in output
    counts = re.findall(
        r"completed exactly from their first words: (\d+)/(\d+)", output
    )
    assert len(counts) == 2  # the base, then the fine-tuned model
    assert all(0 <= int(exact) <= int(total) for exact, total in counts)
    assert re.findall(r"same text: (\w+)", output) == ["True", "True"]
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "base" / "config.json").is_file()


def test_peft_adapters(tmp_path):
    pytest.importorskip("keras_hub")
    output = run_example("peft_adapters.py", tmp_path, "--out", str(tmp_path))
    [loaded] = numbers_after(r"max logit difference vs peft's \(logits.npz\):", output)
    assert loaded < 1e-4  # peft's own logits for its adapter
    [(before, after)] = re.findall(r"loss before (\S+), after (\S+)$", output, re.M)
    assert float(after) < float(before)
    [reloaded] = numbers_after("max logit difference vs the trained model:", output)
    assert reloaded < 1e-5
    adapter_dir = tmp_path / "peft_adapter"
    assert sorted(path.name for path in adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(
        ROOT / "tests" / "fixtures" / "hf" / "llama" / "model"
    )
    if all(
        importlib.util.find_spec(name) for name in ("torch", "transformers", "peft")
    ):
        [stock] = numbers_after("max logit difference vs Keras:", output)
        assert stock < 1e-4
    else:
        assert "Stock peft check skipped: needs torch, transformers and peft" in output
    assert "temporary" not in output
