"""The scenario kinds: gRPC load (closed loop, then open loop at half its throughput), the same
against a bare grpc.aio server or through Envoy to a fleet of replicas, pgbench running the
order SQL, and wrk through Envoy. Each measures, checks the stock invariants, and adds its row
to the bench."""

from __future__ import annotations

from tests.bench.checks import CheckResult, check, mark
from tests.bench.config import HALF_RATE_FRACTION
from tests.bench.cpu import CpuSample
from tests.bench.grpc_load import LoadResult, run_grpc_load
from tests.bench.harness import Bench
from tests.bench.pgbench import run_pgbench, script
from tests.bench.profiling import profiling
from tests.bench.progress import progress
from tests.bench.report import Row
from tests.bench.rows import measured_row, record_half_rate
from tests.bench.stack import start_bare_server, start_bench_envoy
from tests.bench.wrk import ensure_wrk, run_wrk

REST_HALF_RATE_NOTE = (
    "wrk has no fixed-rate (open-loop) mode and wrk2, which has, is not installed"
    " (no Debian package)"
)


def grpc_scenario(
    bench: Bench, scenario: str, kind: str, concurrency: int, *, half_rate: bool = True
) -> Row:
    config, server = bench.config, bench.serving()
    progress(
        f"{scenario}: {concurrency} gRPC clients over {config.generator_processes}"
        f" processes, {config.warmup:g} s warm-up + {config.seconds:g} s ..."
    )
    with profiling(config.profile_dir, scenario, server, config.warmup + config.seconds):
        load, first, last, result = _checked_grpc_load(
            bench,
            kind,
            concurrency,
            warmup=config.warmup,
            seconds=config.seconds,
        )
    row = bench.keep(
        measured_row(
            scenario=scenario,
            tool="grpc.aio",
            concurrency=concurrency,
            load=load,
            first=first,
            last=last,
            result=result,
            server_workers=server.workers,
            seconds=last.time - first.time,
            extra={"ok_total": load.ok_total, "errors_total": dict(load.errors_total)},
        )
    )
    if half_rate and config.half_seconds > 0 and row.throughput > 0:
        _half_rate(bench, row, kind)
    return row


def _checked_grpc_load(
    bench: Bench,
    kind: str,
    concurrency: int,
    *,
    warmup: float,
    seconds: float,
    rate: float = 0.0,
) -> tuple[LoadResult, CpuSample, CpuSample, CheckResult]:
    """One gRPC load run followed by its invariant check (orders counted for orders)."""
    config, server = bench.config, bench.serving()
    orders = kind in ("order-spread", "flash-sale")
    if orders:
        bench.settle_events()
        bench.checkpoint()
    before = mark(bench.db)
    load, first, last = run_grpc_load(
        kind=kind,
        target=server.target,
        concurrency=concurrency,
        tokens=bench.tokens,
        processes=config.generator_processes,
        channels_per_process=config.channels_per_process,
        event_loop=config.generator_event_loop,
        warmup=warmup,
        seconds=seconds,
        sample=bench.sample,
        rate=rate,
    )
    result = check(
        bench.db,
        before,
        client_successes=load.ok_total if orders else 0,
        events=bench.outbox_writes if orders else None,
    )
    return load, first, last, result


def _half_rate(bench: Bench, row: Row, kind: str) -> None:
    """The same scenario open loop at HALF_RATE_FRACTION of the throughput `row` reached;
    its latency and its own invariant check go into `row`."""
    config = bench.config
    rate = row.throughput * HALF_RATE_FRACTION
    progress(
        f"{row.scenario} at half rate: open loop, {rate:.0f} calls/s over"
        f" {config.generator_processes} processes,"
        f" {config.half_warmup:g} s warm-up + {config.half_seconds:g} s ..."
    )
    # Orders of this run are checked on their own: the database must hold exactly the
    # closed-loop run's orders plus these.
    load, first, last, result = _checked_grpc_load(
        bench,
        kind,
        row.concurrency,
        warmup=config.half_warmup,
        seconds=config.half_seconds,
        rate=rate,
    )
    record_half_rate(row, rate=rate, load=load, first=first, last=last, result=result)
    p99 = "-" if row.half_p99_ms is None else f"{row.half_p99_ms:.1f}"
    progress(
        f"  {row.scenario} at half rate: {row.half_throughput:.0f}/s of {rate:.0f}/s"
        f" offered, p99 {p99} ms ({'met' if row.half_p99_met else 'MISSED'}),"
        f" {row.half_errors} errors, check {result.label} ({result.detail})"
    )


def bare_grpc_scenario(bench: Bench, scenario: str, concurrency: int) -> None:
    """`noop` against a bare grpc.aio server instead of ours: grpc.aio's own cost per
    call here, which no change to our code can go below (the main server idles)."""
    saved, bare = (
        bench.server,
        start_bare_server(bench.config.server_workers, bench.scratch / "bare-server.log"),
    )
    bench.server = bare
    try:
        grpc_scenario(bench, scenario, "noop", concurrency)
    finally:
        bench.server = saved
        bare.stop()


def fleet_scenario(bench: Bench, scenario: str, replicas: int, concurrency: int) -> None:
    """order-spread through Envoy to `replicas` independent replicas on the same database.
    Each replica gets an equal share of the main server's processes (at least one), so every
    fleet runs as many server processes as `order-spread` does: fleet:1 against order-spread
    is Envoy's cost alone, fleet:2 against fleet:1 that of splitting them into replicas."""
    workers = max(1, bench.config.server_workers // replicas)
    with bench.serving_fleet(replicas, workers) as fleet:
        row = grpc_scenario(bench, scenario, "order-spread", concurrency)
        calls, retries = fleet.envoy.upstream_calls()
    row.extra.update(
        {
            "replicas": replicas,
            "workers_per_replica": workers,
            # Whole run (warm-up and half rate included), as Envoy counted them.
            "envoy_calls_by_replica": [calls.get(r.grpc_port, 0) for r in fleet.replicas],
            "envoy_retries": retries,
        }
    )


def pgbench_scenario(bench: Bench, scenario: str, kind: str, clients: int) -> None:
    config, db = bench.config, bench.db
    # The servers' pools stay connected meanwhile (the second one's too); keep room for them.
    servers = 2 if bench.without_events is not None else 1
    room = (
        db.max_connections
        - 10
        - servers
        * max(config.server_workers, config.compare_workers)
        * (config.db_pool_size + config.db_max_overflow)
    )
    if clients > room:
        progress(f"{scenario}: skipped, max_connections={db.max_connections} too low")
        return
    progress(
        f"{scenario}: pgbench -M prepared, {clients} clients,"
        f" {config.warmup:g} s warm-up + {config.seconds:g} s ..."
    )
    bench.checkpoint()
    before = mark(db)
    saved_server, bench.server = bench.server, None  # idle: not part of this measurement
    # pgbench commits each order on its own: the product-change NOTIFY (migration 0004)
    # would serialise those commits (20-28% fewer orders/s measured) and slow the
    # baseline, not the database's limit for the order SQL. Off while it runs; then
    # every server process is told that everything changed.
    bench.announce_product_changes(False)
    try:
        run, first, last = run_pgbench(
            db,
            kind=kind,
            sql=bench.order_sql,
            clients=clients,
            threads=config.pgbench_threads,
            warmup=config.warmup,
            seconds=config.seconds,
            scratch=bench.scratch,
            sample=bench.sample,
        )
    finally:
        bench.announce_product_changes(True)
        bench.server = saved_server
    result = check(db, before, client_successes=run.load.ok_total)
    bench.keep(
        measured_row(
            scenario=scenario,
            tool="pgbench",
            concurrency=clients,
            load=run.load,
            first=first,
            last=last,
            result=result,
            server_workers=None,
            seconds=last.time - first.time,
            extra={
                "ok_total": run.load.ok_total,
                "errors_total": dict(run.load.errors_total),
                "pgbench_reported_tps": run.reported_tps,
                "pgbench_cpu_whole_run_s": round(run.cpu_seconds, 3),
                "pgbench_sql_source": bench.order_sql.source,
                "pgbench_script": script(kind, bench.order_sql),
            },
        )
    )


def rest_scenario(bench: Bench, scenario: str, concurrency: int) -> None:
    config, server = bench.config, bench.running_server()
    wrk = ensure_wrk()
    if wrk is None:
        progress(f"{scenario}: skipped, wrk is not installed and cannot be installed here")
        return
    if bench.envoy is None:
        bench.envoy = start_bench_envoy(server.grpc_port, bench.scratch)
    progress(
        f"{scenario}: wrk, {concurrency} connections through Envoy,"
        f" {config.warmup:g} s warm-up + {config.seconds:g} s ..."
    )
    bench.checkpoint()
    before = mark(bench.db)
    run, first, last = run_wrk(
        wrk,
        base_url=f"http://127.0.0.1:{bench.envoy.http_port}",
        tokens=bench.tokens[:concurrency],
        connections=concurrency,
        threads=config.wrk_threads,
        warmup=config.warmup,
        seconds=config.seconds,
        scratch=bench.scratch,
        sample=bench.sample,
    )
    result = check(
        bench.db,
        before,
        client_successes=run.ok_total,
        client_unknown=run.unanswered_total,
        events=bench.outbox_writes,
    )
    measured = run.measured
    row = bench.keep(
        measured_row(
            scenario=scenario,
            tool="wrk",
            concurrency=concurrency,
            load=LoadResult(),
            first=first,
            last=last,
            result=result,
            server_workers=server.workers,
            seconds=measured.duration_seconds,
            generator_cpu=measured.cpu_seconds,
            latency=(measured.p50_ms, measured.p99_ms, measured.max_ms),
            ok=measured.ok,
            errors=run.errors_window,
            extra={
                "ok_total": run.ok_total,
                "unanswered_at_stop": run.unanswered_total,
                "first_failure": measured.first_failure,
                "cpu_window_s": round(last.time - first.time, 3),
            },
        )
    )
    if config.half_seconds > 0:
        row.half_note = REST_HALF_RATE_NOTE
