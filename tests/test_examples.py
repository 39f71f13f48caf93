"""Every example runs on its smoke settings and prints sane key numbers."""

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
def test_quickstart(tmp_path):
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


def test_transformer_text(tmp_path):
    output = run_example("transformer_text.py", tmp_path)
    paths = re.findall(r"^   (\S+/\S+)$", output, re.M)
    assert paths == ["attention/query", "attention/value"]
    assert "trainable params:" in output
    assert "LoraEinsumDense" in output
    [(before, after)] = accuracies(output)
    assert 0 <= before <= 1 and 0 <= after <= 1


def test_multi_adapter(tmp_path):
    output = run_example("multi_adapter.py", tmp_path, "--out", str(tmp_path))
    assert len(accuracies(output)) == 2
    for name in ("task_a", "task_b"):
        assert (tmp_path / name / "adapter.safetensors").is_file()
    gaps = numbers_after("max output difference", output)
    assert len(gaps) == 2
    assert max(gaps) < 1e-5


def test_lora_vs_full(tmp_path):
    output = run_example("lora_vs_full.py", tmp_path, "--out", str(tmp_path / "out"))
    rows = {
        match[0]: [float(value.replace(",", "")) for value in match[1:]]
        for match in re.findall(
            r"^\s+(LoRA|full)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
            output,
            re.M,
        )
    }
    assert set(rows) == {"LoRA", "full"}
    (lora_trainable, *lora_rest), (full_trainable, *full_rest) = (
        rows["LoRA"],
        rows["full"],
    )
    assert 0 < lora_trainable < full_trainable
    for accuracy, step_ms, peak_mb in (lora_rest, full_rest):
        assert 0 <= accuracy <= 1 and step_ms > 0 and peak_mb > 0
    png = tmp_path / "out" / "lora_vs_full.png"
    assert png.read_bytes().startswith(b"\x89PNG")


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
