"""convert(): its time on a deep model, its memory on a large one."""

from __future__ import annotations

import math
import time

import keras
import numpy as np

import keras_lora
from benchmarks import measure
from benchmarks.report import (
    CONVERT_MEMORY_FRACTION,
    CONVERT_SECONDS_TARGET,
    Row,
    check,
)
from benchmarks.workloads import RANK, SEED

MIB = 2**20


def deep(tiny: bool = False) -> keras.Model:
    """A Functional chain of 300 Dense(64) layers (30 of Dense(8) if tiny)."""
    count, width = (30, 8) if tiny else (300, 64)
    return _chain(count, width)


def large(tiny: bool = False) -> keras.Model:
    """8 x Dense(4096) on 4096 features: 512 MiB of float32 kernels."""
    return _chain(8, 64 if tiny else 4096)


def convert_jobs(tiny: bool, repeats: int) -> dict:
    """The child-process jobs `convert_rows` needs: the median time over
    `repeats` conversions of fresh copies of the deep model, and the time and
    peak memory of one conversion of the large model."""
    return {
        ("convert", "deep"): (convert_cost, ("deep", tiny, repeats)),
        ("convert", "large"): (convert_cost, ("large", tiny, 1)),
    }


def convert_rows(children: measure.Children) -> list[Row]:
    """The cost of `convert()`, each model converted in a process of its own."""
    deep_cost = children.result(("convert", "deep"))
    large_cost = children.result(("convert", "large"))
    deep_row = Row(
        "convert", _name("deep", deep_cost), "time", deep_cost["seconds"], "s"
    )
    deep_row.target = f"< {CONVERT_SECONDS_TARGET:g} s"
    deep_row.passed = deep_cost["seconds"] < CONVERT_SECONDS_TARGET
    large_name = _name("large", large_cost)
    adapter_bytes = large_cost["adapter_bytes"]
    allowed = CONVERT_MEMORY_FRACTION * large_cost["model_bytes"] + adapter_bytes
    growth = large_cost["peak"] - large_cost["start"]
    memory_row = Row(
        "convert",
        large_name,
        "peak RSS",
        growth / MIB,
        "MiB",
        ratios={"/allowed": growth / allowed},
        detail=f"allowed {allowed / MIB:.1f} MiB = 5% of the weights + "
        f"{adapter_bytes / MIB:.1f} MiB of adapters",
    )
    return [
        deep_row,
        Row("convert", large_name, "time", large_cost["seconds"], "s"),
        check(memory_row, "/allowed", 1.0, strict=True),
    ]


def convert_cost(builder: str, tiny: bool, repeats: int = 1) -> dict:
    """Run in a child process: converts `repeats` fresh copies of the model
    (every Dense adapted) and returns the median time, the RSS before and the
    peak during the last `convert()`, and the sizes of the weights and
    adapters in bytes."""
    keras_lora.convert(_chain(3, 4), rank=RANK)  # first-use imports and caches
    seconds = []
    for _ in range(repeats):
        model = {"deep": deep, "large": large}[builder](tiny)
        with measure.peak_rss() as rss:
            start = time.perf_counter()
            lora_model = keras_lora.convert(model, rank=RANK)
            seconds.append(time.perf_counter() - start)
    adapters = keras_lora.lora_layers(lora_model).values()
    return {
        "seconds": measure.median(seconds),
        "start": rss["start"],
        "peak": rss["peak"],
        "layers": len(adapters),
        "model_bytes": _bytes(model.weights),
        "adapter_bytes": _bytes(
            [v for layer in adapters for v in (layer.lora_a, layer.lora_b)]
        ),
    }


def _name(builder, cost):
    return f"{builder} ({cost['layers']} Dense, {cost['model_bytes'] / MIB:.0f} MiB)"


def _chain(count, width):
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((width,))
    x = inputs
    for _ in range(count):
        x = keras.layers.Dense(width)(x)
    return keras.Model(inputs, x)


def _bytes(variables):
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)
