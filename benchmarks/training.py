"""Training: step time (with and without XLA) and peak memory per setup."""

from __future__ import annotations

import tensorflow as tf

from benchmarks import measure
from benchmarks.report import STEP_FLOORS, STEP_TARGETS, XLA_TARGET, Row, check
from benchmarks.setups import SETUPS, compile_model, make_model, trainable_count
from benchmarks.workloads import WORKLOADS, Workload

MIB = 2**20


def step_rows(workload: Workload, rounds: int, warmup: int) -> list[Row]:
    """Times one compiled train step of every setup, with and without XLA.

    All six models are timed in the same interleaved rounds, on the same fixed
    batch, so every ratio compares steps taken under the same load.
    """
    x, y = batch_tensors(workload)
    steps, models = {}, {}
    for jit_compile in (False, True):
        for setup in SETUPS:
            model = make_model(workload, setup)
            compile_model(model, workload, jit_compile)
            key = (setup, jit_compile)
            models[key] = model
            steps[key] = _train_step(model, x, y)
    times = measure.interleave(steps, rounds, warmup)
    rows = []
    for setup in SETUPS:
        graph = times[(setup, False)]
        row = Row(
            "training",
            workload.name,
            setup,
            measure.median(graph) * 1000,
            "ms",
            ratios={
                "/builtin": measure.paired_ratio(graph, times[("builtin", False)]),
                "/full": measure.paired_ratio(graph, times[("full", False)]),
            },
            detail=f"{trainable_count(models[(setup, False)]):,} trainable",
        )
        if setup == "keras_lora":
            check(
                row,
                "/builtin",
                STEP_TARGETS[workload.name],
                floor=STEP_FLOORS[workload.name],
            )
        rows.append(row)
    # XLA's own cost on this machine and stack: full fine-tuning's ratio.
    xla_floor = measure.paired_ratio(times[("full", True)], times[("full", False)])
    for setup in SETUPS:
        graph, xla = times[(setup, False)], times[(setup, True)]
        model = models[(setup, True)]
        row = Row(
            "xla",
            workload.name,
            setup,
            measure.median(xla) * 1000,
            "ms",
            ratios={
                "/no-xla": measure.paired_ratio(xla, graph),
                "/builtin": measure.paired_ratio(xla, times[("builtin", True)]),
            },
            detail="jit_compile=True" if model.jit_compile else "XLA refused",
        )
        if setup == "keras_lora":
            check(row, "/no-xla", XLA_TARGET, floor=xla_floor)
            row.passed = row.passed and bool(model.jit_compile)
        rows.append(row)
    return rows


def memory_jobs(workload_name: str, tiny: bool, steps: int) -> dict:
    """The child-process jobs `memory_rows` needs: one per setup."""
    return {
        ("memory", workload_name, setup): (
            training_peak,
            (workload_name, setup, tiny, steps),
        )
        for setup in SETUPS
    }


def memory_rows(workload_name: str, children: measure.Children) -> list[Row]:
    """Peak RSS while training, each setup measured in a process of its own."""
    peaks = {
        setup: children.result(("memory", workload_name, setup)) for setup in SETUPS
    }
    growth = {
        setup: peak["peak"] - peak["after_build"] for setup, peak in peaks.items()
    }
    rows = []
    for setup in SETUPS:
        row = Row(
            "memory",
            workload_name,
            setup,
            growth[setup] / MIB,
            "MiB",
            ratios={"/builtin": growth[setup] / max(growth["builtin"], 1)},
            detail=f"peak RSS - RSS after build; absolute peak "
            f"{peaks[setup]['peak'] / MIB:.0f} MiB",
        )
        if setup == "keras_lora":
            check(row, "/builtin", 1.0)
        rows.append(row)
    return rows


def training_peak(workload_name: str, setup: str, tiny: bool, steps: int) -> dict:
    """Run in a child process: trains `steps` steps, returns the RSS after the
    model was built and compiled and the peak RSS while training, in bytes."""
    workload = WORKLOADS[workload_name](tiny)
    x, y = batch_tensors(workload)
    model = make_model(workload, setup)
    compile_model(model, workload, jit_compile=False)
    after_build = measure.rss_bytes()
    with measure.peak_rss() as rss:
        for _ in range(steps):
            model.train_on_batch(x, y)
    return {"after_build": after_build, "peak": rss["peak"]}


def batch_tensors(workload: Workload) -> tuple:
    """The workload's fixed `(x, y)` batch as tensors (`x` may be a dict)."""
    return tuple(tf.nest.map_structure(tf.constant, part) for part in workload.batch())


def _train_step(model, x, y):
    def step():
        return model.train_on_batch(x, y)

    return step
