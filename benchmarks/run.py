"""The command line: run the suite, print the table, optionally write JSON.

python -m benchmarks                      # full run, several minutes
python -m benchmarks --quick              # fewer rounds
python -m benchmarks --workloads dense,conv --json results.json
python -m benchmarks --workloads causal_lm  # keras-hub Gemma (needs keras-hub)
python -m benchmarks --quick --tiny       # tiny shapes: checks it runs
python -m benchmarks.peft_comparison      # keras_lora vs peft, same Llama weights
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_lora  # noqa: E402
from benchmarks import conversion, inference, measure, report, training  # noqa: E402
from benchmarks.workloads import REQUIRES, WORKLOADS, available  # noqa: E402

FULL = {
    "rounds": 20,
    "inference_rounds": 30,
    "warmup": 3,
    "memory_steps": 3,
    "convert_repeats": 3,
}
QUICK = {
    "rounds": 3,
    "inference_rounds": 5,
    "warmup": 1,
    "memory_steps": 2,
    "convert_repeats": 1,
}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if keras.backend.backend() != "tensorflow":
        raise SystemExit(
            "The benchmarks run on the TensorFlow backend. "
            f"Received: KERAS_BACKEND={keras.backend.backend()}"
        )
    settings = QUICK if args.quick else FULL
    jobs = {}
    for name in args.workloads:
        jobs.update(training.memory_jobs(name, args.tiny, settings["memory_steps"]))
    if args.convert:
        jobs.update(conversion.convert_jobs(args.tiny, settings["convert_repeats"]))
    # Full size: one child at a time, started only when its turn comes, so no
    # child runs beside a timing. Tiny shapes (a smoke run, whose timings mean
    # nothing): all children start now, two at a time, beside the timings.
    preload = tuple(REQUIRES[name] for name in args.workloads if name in REQUIRES)
    children = measure.Children(jobs, workers=2 if args.tiny else 1, preload=preload)
    if args.tiny:
        children.start_all()
    try:
        return _run(args, settings, children)
    finally:
        children.close()


def _run(args, settings, children):
    rounds, warmup = settings["rounds"], settings["warmup"]
    machine = _machine()
    print(_describe(machine, args), flush=True)
    started = time.perf_counter()
    rows = []
    for name in args.workloads:
        workload = WORKLOADS[name](args.tiny)
        print(f"\n# {name}: {workload.description}", flush=True)
        rows += _show(training.step_rows(workload, rounds, warmup))
        rows += _show(training.memory_rows(name, children))
        rows += _show(
            inference.inference_rows(workload, settings["inference_rounds"], warmup)
        )
    if args.convert:
        print("\n# convert()", flush=True)
        rows += _show(conversion.convert_rows(children))
    elapsed = time.perf_counter() - started
    machine["load_average_after"] = os.getloadavg()
    load = ", ".join(f"{value:.2f}" for value in machine["load_average_after"])
    print(f"\n# all results ({elapsed:.0f} s; load average now {load})")
    print(report.table(rows))
    print(report.summary(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {
                    "machine": machine,
                    "settings": {**settings, "tiny": args.tiny},
                    "seconds": elapsed,
                    "rows": [dataclasses.asdict(row) for row in rows],
                },
                file,
                indent=2,
            )
    return 0


def _show(rows):
    print(report.table(rows), flush=True)
    return rows


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short pass: fewer rounds and steps"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes (for the suite's own test)"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(available()),
        help=f"comma-separated, from {','.join(WORKLOADS)} (default: all whose "
        "packages are installed)",
    )
    parser.add_argument(
        "--no-convert", dest="convert", action="store_false", help="skip convert()"
    )
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    args.workloads = [name for name in args.workloads.split(",") if name]
    unknown = [name for name in args.workloads if name not in WORKLOADS]
    if unknown or not args.workloads:
        parser.error(f"--workloads must name some of {list(WORKLOADS)}: {unknown}")
    missing = [name for name in args.workloads if name not in available()]
    if missing:
        parser.error(
            f"--workloads {','.join(missing)} needs "
            f"{', '.join(REQUIRES[name] for name in missing)}, which is not "
            "installed: `pip install -e .[hub]`"
        )
    return args


def _machine():
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line for line in cpuinfo if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "keras_lora": keras_lora.__version__,
    }


def _describe(machine, args):
    load = ", ".join(f"{value:.2f}" for value in machine["load_average"])
    mode = ("quick" if args.quick else "full") + (", tiny shapes" if args.tiny else "")
    return (
        f"keras_lora {machine['keras_lora']} benchmarks ({mode}): "
        f"{machine['cpus']} x {machine['cpu']}, load average {load}; Python "
        f"{machine['python']}, Keras {machine['keras']}, TensorFlow "
        f"{machine['tensorflow']}, NumPy {machine['numpy']}"
    )


if __name__ == "__main__":
    sys.exit(main())
