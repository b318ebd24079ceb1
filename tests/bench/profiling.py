"""BENCH_PROFILE: py-spy samples each server worker while a scenario's load runs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from tests.bench.progress import progress
from tests.bench.stack import Serving


@contextlib.contextmanager
def profiling(
    profile_dir: str | None, scenario: str, server: Serving, seconds: float
) -> Iterator[None]:
    """One speedscope profile per worker of `server` in `profile_dir`; nothing without one."""
    if profile_dir is None:
        yield
        return
    directory = Path(profile_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    workers = []
    for pid in server.root_pids:  # one per replica of a fleet
        root = psutil.Process(pid)
        # SERVER_WORKERS=1 serves in the supervisor's own process; otherwise its children.
        workers += root.children() or [root]
    spy = Path(sys.executable).with_name("py-spy")
    recorders = [
        subprocess.Popen(
            [
                str(spy),
                "record",
                "--nonblocking",
                "--format",
                "speedscope",
                "--rate",
                "200",
                "--duration",
                str(int(seconds) + 1),
                "--pid",
                str(worker.pid),
                "--output",
                str(directory / f"{scenario}-{worker.pid}.speedscope.json"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for worker in workers
    ]
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.wait(timeout=60)
        progress(f"  profiles of {len(recorders)} worker(s) written to {directory}")
