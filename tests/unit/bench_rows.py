"""A measured gRPC row of the bench's report, for the report's tests: the figures they
compare, every CPU column left unmeasured."""

from __future__ import annotations

from typing import Any

from tests.bench.report import Row


def bench_row(
    scenario: str, throughput: float, p50: float = 30.0, p99: float = 90.0, **extra: Any
) -> Row:
    return Row(
        scenario=scenario,
        tool="grpc.aio",
        server_workers=2,
        concurrency=64,
        seconds=10.0,
        ok=int(throughput * 10),
        throughput=throughput,
        p50_ms=p50,
        p99_ms=p99,
        max_ms=p99 * 2,
        errors=0,
        error_kinds={},
        check="ok",
        check_detail="",
        cpu_generator_s=None,
        cpu_server_s=None,
        cpu_envoy_s=None,
        cpu_postgres_s=None,
        extra=extra,
    )
