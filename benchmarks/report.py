"""Result rows, the issue's targets, and the printed table."""

from __future__ import annotations

import dataclasses

# keras_lora training step / built-in LoRA training step, same run (issue #5;
# causal_lm: keras-hub's `backbone.enable_lora`, issue #12).
STEP_TARGETS = {
    "dense": 0.72,
    "conv": 0.85,
    "embedding": 0.30,
    "attention": 0.80,
    "causal_lm": 1.00,
}
# The lowest ratio any factorised LoRA can reach, by counting matmul-sized
# products per step (docs/performance.md, "Reading the results"): it skips
# the kernel gradients the built-in computes and nothing else.
STEP_FLOORS = {
    "dense": 0.65,
    "conv": 0.64,
    "embedding": 0.04,
    "attention": 0.92,
    "causal_lm": 0.98,
}
MERGED_TARGET = 1.02
UNMERGED_TARGET = 1.10
# Unmerged inference folds the adapters into the kernel where that is cheaper,
# so its floor is the merged model's (1.00), except for an embedding lookup:
# the table is far larger than the output, so the adapter is computed
# factorised, one more output-sized pass (issue #5).
UNMERGED_FLOORS = {"embedding": 1.4}
CONVERT_SECONDS_TARGET = 2.0
CONVERT_MEMORY_FRACTION = 0.05
# "No slower than without XLA": 5% is the noise band of a shared 2-core CPU.
XLA_TARGET = 1.05


@dataclasses.dataclass
class Row:
    """One line of the report.

    Attributes:
        section: `"training"`, `"xla"`, `"memory"`, `"inference"` or
            `"convert"`.
        workload: the workload (or the converted model).
        variant: the setup (`full`, `builtin`, `keras_lora`) or inference mode.
        value: the headline number (milliseconds, seconds or MiB).
        unit: the unit of `value`.
        ratios: named ratios, e.g. `{"/builtin": 0.7}`.
        detail: extra context shown in the table.
        target: the target this row is held to, in words; empty if none.
        passed: whether the target is met; `None` if there is no target.
    """

    section: str
    workload: str
    variant: str
    value: float
    unit: str
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    detail: str = ""
    target: str = ""
    passed: bool | None = None


def check(
    row: Row,
    ratio: str,
    limit: float,
    strict: bool = False,
    floor: float | None = None,
) -> Row:
    """Holds `row.ratios[ratio]` to `<= limit` (`< limit` if `strict`).

    Args:
        row: the row; its `target` and `passed` are set.
        ratio: the name of the ratio held to the limit.
        limit: the target.
        strict: hold the ratio to `< limit` instead.
        floor: the lowest value the ratio can reach, shown with the target.

    Returns:
        `row`.
    """
    value = row.ratios[ratio]
    row.target = f"{ratio} {'<' if strict else '<='} {limit:g}"
    if floor is not None:
        row.target += f" (floor {floor:.2f})"
    row.passed = value < limit if strict else value <= limit
    return row


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table, one line per row."""
    header = ("section", "workload", "variant", "median", "ratios", "target", "", "")
    lines = [header]
    for row in rows:
        ratios = "  ".join(f"{name} {value:.3f}" for name, value in row.ratios.items())
        result = "" if row.passed is None else ("PASS" if row.passed else "MISS")
        lines.append(
            (
                row.section,
                row.workload,
                row.variant,
                f"{row.value:.4g} {row.unit}",
                ratios,
                row.target,
                result,
                row.detail,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(line, widths, strict=True)
        ).rstrip()
        for line in lines
    )


def summary(rows: list[Row]) -> str:
    """One line: how many targets pass, and which miss."""
    held = [row for row in rows if row.passed is not None]
    missed = [f"{r.section}/{r.workload}/{r.variant}" for r in held if not r.passed]
    line = f"targets: {len(held) - len(missed)}/{len(held)} PASS"
    return f"{line}; MISS: {', '.join(missed)}" if missed else line
