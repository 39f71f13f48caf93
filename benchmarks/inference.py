"""Inference: the base model against keras_lora unmerged and merged."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import keras_lora
from benchmarks import measure
from benchmarks.report import (
    MERGED_TARGET,
    UNMERGED_FLOORS,
    UNMERGED_TARGET,
    Row,
    check,
)
from benchmarks.training import batch_tensors
from benchmarks.workloads import RANK, Workload

MODES = ("base", "base-copy", "unmerged", "merged")


def inference_rows(workload: Workload, rounds: int, warmup: int) -> list[Row]:
    """Times a compiled forward pass of the base model, of its keras_lora
    conversion, and of a second conversion merged with `keras_lora.merge`.

    The adapters are given random values first (a fresh adapter adds zero),
    so the merged kernels really differ from the base ones. A second copy of
    the base model is timed too: its ratio to the first shows the run's noise
    (a merged model computes exactly what the base model does).
    """
    x = batch_tensors(workload)[0]
    unmerged = _with_random_adapters(workload)
    merged = _with_random_adapters(workload)
    keras_lora.merge(merged)
    models = {
        "base": workload.build(),
        "base-copy": workload.build(),
        "unmerged": unmerged,
        "merged": merged,
    }
    times = measure.interleave(
        {mode: _forward(model, x) for mode, model in models.items()}, rounds, warmup
    )
    rows = []
    for mode in MODES:
        row = Row(
            "inference",
            workload.name,
            mode,
            measure.median(times[mode]) * 1000,
            "ms",
            ratios={"/base": measure.paired_ratio(times[mode], times["base"])},
            detail="noise floor: the same model again" if mode == "base-copy" else "",
        )
        if mode == "merged":
            check(row, "/base", MERGED_TARGET)
        elif mode == "unmerged":
            floor = UNMERGED_FLOORS.get(workload.name, 1.0)
            check(row, "/base", UNMERGED_TARGET, floor=floor)
        rows.append(row)
    return rows


def _with_random_adapters(workload):
    model = keras_lora.convert(workload.build(), rank=RANK, targets=workload.targets)
    rng = np.random.default_rng(0)
    for layer in keras_lora.lora_layers(model).values():
        for factor in (layer.lora_a, layer.lora_b):
            factor.assign(0.01 * rng.standard_normal(factor.shape).astype("float32"))
    return model


def _forward(model, x):
    forward = tf.function(lambda inputs: model(inputs, training=False))

    def step():
        return forward(x).numpy()

    return step
