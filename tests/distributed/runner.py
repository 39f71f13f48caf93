"""Runs the scenario scripts of `scripts/` in fresh processes and reads their
results.

A scenario sets up devices (logical CPUs, host devices for XLA, a worker
cluster) before TensorFlow or JAX initialise, which the test process has
already done, so each runs in its own interpreter with its own backend. The
processes are bounded in time (killed, with their children, when it runs
out), talk over 127.0.0.1 only, and print one `RESULT {json}` line each.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"
ROOT = SCRIPTS.parents[2]

# Outer settings a scenario must not inherit: it picks its own backend and
# devices, and local gRPC traffic must not go through a proxy.
_DROPPED = {"KERAS_BACKEND", "XLA_FLAGS", "TF_CONFIG", "JAX_PLATFORMS"}
_PROXIES = {"http_proxy", "https_proxy", "grpc_proxy", "all_proxy"}


def environment(backend: str, **settings: str) -> dict[str, str]:
    """The outer environment for a scenario on `backend`, plus `settings`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _DROPPED and key.lower() not in _PROXIES
    }
    env.update(
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        **settings,
    )
    return env


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1, found by binding port 0."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run(
    tmp_path: pathlib.Path,
    script: str,
    envs: list[dict[str, str]],
    *args: str,
    timeout: float,
) -> tuple[list[dict], float]:
    """Runs `script` once per environment in `envs`, all at the same time.

    Args:
        tmp_path: where the processes' output files go.
        script: a file name in `scripts/`.
        envs: one environment per process.
        *args: command-line arguments for every process.
        timeout: seconds for all of them together.

    Returns:
        Each process's parsed result, in order, and the wall time in seconds.
    """
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        processes = []
        for index, env in enumerate(envs):
            log = stack.enter_context(open(tmp_path / f"{script}.{index}.log", "w+"))
            process = subprocess.Popen(
                [sys.executable, str(SCRIPTS / script), *args],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                # A session of its own, so that a timeout kills its children.
                start_new_session=True,
            )
            processes.append((process, log))
        try:
            for process, _ in processes:
                remaining = timeout - (time.monotonic() - started)
                process.wait(timeout=max(remaining, 0))
        except subprocess.TimeoutExpired:
            _kill(processes)
            pytest.fail(
                f"{script} did not finish within {timeout:.0f} s; killed.\n"
                + _tails(processes)
            )
        wall = time.monotonic() - started
        failed = [process.returncode for process, _ in processes]
        if any(failed):
            pytest.fail(f"{script} exited with status {failed}.\n" + _tails(processes))
        return [_result(log) for _, log in processes], wall


def _kill(processes) -> None:
    for process, _ in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _output(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def _tails(processes) -> str:
    return "\n".join(
        f"--- process {index} ---\n{_output(log)[-3000:]}"
        for index, (_, log) in enumerate(processes)
    )


def _result(log) -> dict:
    lines = [line for line in _output(log).splitlines() if line.startswith("RESULT ")]
    if len(lines) != 1:
        pytest.fail(f"expected one RESULT line, got {len(lines)}:\n{_output(log)}")
    return json.loads(lines[0].removeprefix("RESULT "))
