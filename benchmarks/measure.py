"""Timing and memory measurement: interleaved rounds, medians, process RSS."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import multiprocessing.forkserver
import statistics
import threading
import time
from collections.abc import Callable, Iterator

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def interleave(
    steps: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Times each step `rounds` times, in turn (A B C A B C ...), after warm-up.

    Interleaving spreads any change in machine load over every step alike, so
    ratios taken round by round stay fair on a shared machine.

    Args:
        steps: name to a function doing one step (it must block until done).
        rounds: how many timed calls of each step.
        warmup: untimed calls of each step first (tracing, compiling, caches).

    Returns:
        Name to the list of step times in seconds, one per round.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of `numerator / denominator` in the same round.

    Pairing by round cancels load that changes between rounds.
    """
    return statistics.median(
        a / b for a, b in zip(numerators, denominators, strict=True)
    )


def rss_bytes() -> int:
    """The process's resident set size now."""
    return _status_kib("VmRSS") * 1024


@contextlib.contextmanager
def peak_rss() -> Iterator[dict]:
    """Measures the peak RSS of the process inside the block.

    Yields a dict that holds, after the block, `"start"` (RSS on entry) and
    `"peak"` (the highest RSS inside), in bytes. On Linux the kernel's
    high-water mark is reset on entry (`/proc/self/clear_refs`); where that is
    refused, a thread samples RSS every millisecond instead.
    """
    result = {"start": rss_bytes()}
    try:
        with open(_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        sampler = _RssSampler()
        with sampler:
            yield result
        result["peak"] = max(sampler.peak, result["start"])
        return
    yield result
    result["peak"] = _status_kib("VmHWM") * 1024


class Children:
    """Runs jobs, each in a new child process of its own, `workers` at a time.

    A process of its own keeps each measurement's memory peak apart. Children
    are forked from a server that has already imported Keras and keras_lora, so
    each costs well under a second instead of a fresh import.

    Args:
        jobs: key to `(function, args)`; `function` must be importable.
        workers: how many children may run at once. With 1, a job starts only
            when its result is asked for, so it never runs alongside a timing.
        preload: more modules for the server to import first (keras-hub).
    """

    def __init__(
        self,
        jobs: dict[object, tuple[Callable, tuple]],
        workers: int = 1,
        preload: tuple[str, ...] = (),
    ):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["keras_lora", "benchmarks.workloads", *preload])
        multiprocessing.forkserver.ensure_running()
        self._jobs = jobs
        self._futures = {}
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=context, max_tasks_per_child=1
        )

    def start_all(self) -> None:
        """Starts every job now (in the background, `workers` at a time)."""
        for key in self._jobs:
            self._submit(key)

    def result(self, key):
        """The result of a job, started now if it has not been."""
        return self._submit(key).result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def _submit(self, key) -> concurrent.futures.Future:
        if key not in self._futures:
            function, args = self._jobs[key]
            self._futures[key] = self._pool.submit(function, *args)
        return self._futures[key]


def _status_kib(field: str) -> int:
    with open(_STATUS) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{_STATUS} has no {field} field")


class _RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self._done = threading.Event()

    def run(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self._done.set()
        self.join()
        self.peak = max(self.peak, rss_bytes())
