"""CPU sampling: every party's cumulative CPU seconds at one instant, taken at both ends of a
measured window so that a scenario's CPU cost is the difference."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil  # type: ignore[import-untyped]

from tests.bench.stack import (
    EnvoyProcess,
    Serving,
    tree_cpu_by_process,
    tree_cpu_seconds,
    tree_rss_mb,
)


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds of each party at one instant."""

    time: float
    generator: float
    server: float | None
    server_by_process: dict[int, float]
    envoy: float | None
    postgres: float | None
    server_rss_mb: tuple[float, ...]
    machine_busy: float  # every CPU's non-idle time, whoever used it


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    # /proc/stat's user already includes guest time; idle, iowait and steal are not ours.
    return float(
        times.user
        + times.nice
        + times.system
        + getattr(times, "irq", 0.0)
        + getattr(times, "softirq", 0.0)
    )


def cpu_delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def sample_cpu(
    generator_pids: list[int],
    *,
    server: Serving | None,
    envoy: EnvoyProcess | None,
    postmaster_pid: int | None,
) -> CpuSample:
    """A sample of the load generators, and of whichever of the server (every replica of a
    fleet), Envoy and the local PostgreSQL are running (None for the others)."""
    roots = server.root_pids if server else []
    server_by_process = {
        pid: seconds for root in roots for pid, seconds in tree_cpu_by_process(root).items()
    }
    return CpuSample(
        time=time.monotonic(),
        generator=sum(tree_cpu_seconds(pid) for pid in generator_pids),
        server=sum(server_by_process.values()) if server else None,
        server_by_process=server_by_process,
        envoy=tree_cpu_seconds(envoy.process.pid) if envoy else None,
        postgres=tree_cpu_seconds(postmaster_pid) if postmaster_pid else None,
        server_rss_mb=tuple(size for root in roots for size in tree_rss_mb(root)),
        machine_busy=machine_busy_seconds(),
    )
