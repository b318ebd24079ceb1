"""Row assembly: a scenario's load result, CPU samples and invariant check become its Row, and
its half-rate run is folded into the same Row."""

from __future__ import annotations

import os

from tests.bench.checks import CheckResult
from tests.bench.config import HALF_RATE_P99_TARGET_MS
from tests.bench.cpu import CpuSample, cpu_delta
from tests.bench.grpc_load import LoadResult
from tests.bench.report import Row, percentile


def measured_row(
    *,
    scenario: str,
    tool: str,
    concurrency: int,
    load: LoadResult,
    first: CpuSample,
    last: CpuSample,
    result: CheckResult,
    server_workers: int | None,
    seconds: float,
    generator_cpu: float | None = None,
    latency: tuple[float | None, float | None, float | None] | None = None,
    ok: int | None = None,
    errors: dict[str, int] | None = None,
    extra: dict[str, object] | None = None,
) -> Row:
    """Latency, successes and errors come from `load` unless given (wrk measures its own)."""
    if latency is None:
        ordered = sorted(load.latencies_ms)
        latency = (
            percentile(ordered, 50),
            percentile(ordered, 99),
            float(ordered[-1]) if ordered else None,
        )
    ok = load.ok_window if ok is None else ok
    errors = dict(load.errors_window) if errors is None else errors
    row = Row(
        scenario=scenario,
        tool=tool,
        server_workers=server_workers,
        concurrency=concurrency,
        seconds=round(seconds, 3),
        ok=ok,
        throughput=ok / seconds if seconds else 0.0,
        p50_ms=latency[0],
        p99_ms=latency[1],
        max_ms=latency[2],
        errors=sum(errors.values()),
        error_kinds=errors,
        check=result.label,
        check_detail=result.detail,
        cpu_generator_s=(
            generator_cpu if generator_cpu is not None else last.generator - first.generator
        ),
        cpu_server_s=cpu_delta(last.server, first.server) if server_workers else None,
        # None unless Envoy ran: in front of wrk, or of a fleet.
        cpu_envoy_s=cpu_delta(last.envoy, first.envoy),
        cpu_postgres_s=cpu_delta(last.postgres, first.postgres),
        server_rss_mb=[round(size, 1) for size in last.server_rss_mb] if server_workers else [],
        extra=dict(extra or {}),
    )
    accounted = sum(
        value or 0.0
        for value in (
            row.cpu_generator_s,
            row.cpu_server_s,
            row.cpu_envoy_s,
            row.cpu_postgres_s,
        )
    )
    if server_workers:
        # Per server process (the supervisor too), to see how evenly workers are loaded.
        row.extra["server_cpu_by_process_s"] = {
            str(pid): round(seconds - first.server_by_process.get(pid, 0.0), 3)
            for pid, seconds in last.server_by_process.items()
        }
    # What else ran meanwhile: this process, the kernel, anything outside the bench.
    row.cpu_other_s = max(0.0, last.machine_busy - first.machine_busy - accounted)
    return row


def record_half_rate(
    row: Row,
    *,
    rate: float,
    load: LoadResult,
    first: CpuSample,
    last: CpuSample,
    result: CheckResult,
) -> None:
    """The open-loop run at `rate` calls per second: its latency, CPU and own invariant
    check go into `row`, the closed-loop run's."""
    seconds = last.time - first.time
    ordered = sorted(load.latencies_ms)
    row.half_target_rate = rate
    row.half_seconds = round(seconds, 3)
    row.half_throughput = load.ok_window / seconds if seconds else 0.0
    row.half_p50_ms = percentile(ordered, 50)
    row.half_p99_ms = percentile(ordered, 99)
    row.half_max_ms = float(ordered[-1]) if ordered else None
    row.half_errors = sum(load.errors_window.values())
    # Whether half the rate was half the work: CPU per call grows at lower rates (smaller
    # batches, fewer calls sharing each wake-up of the event loop).
    if seconds:
        row.half_machine_busy = (last.machine_busy - first.machine_busy) / (
            seconds * (os.cpu_count() or 1)
        )
    row.half_ok = load.ok_window
    row.half_cpu_server_s = cpu_delta(last.server, first.server)
    row.half_cpu_postgres_s = cpu_delta(last.postgres, first.postgres)
    row.half_p99_met = (
        row.half_p99_ms is not None
        and row.half_p99_ms <= HALF_RATE_P99_TARGET_MS
        and not row.half_errors
    )
    row.extra.update(
        {
            "half_ok_total": load.ok_total,
            "half_errors_total": dict(load.errors_total),
            "half_error_kinds": dict(load.errors_window),
            "half_scheduled": load.scheduled_window,
            "half_launched_late": load.launched_late,
            "half_max_lag_ms": round(load.max_launch_lag_ms, 3),
            "half_check_detail": result.detail,
        }
    )
    if not result.ok:
        row.check = result.label
    row.check_detail += f"; at half rate: {result.detail}"
