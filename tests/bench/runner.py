"""Runs every scenario against one stack and reports. Entry point: `python -m tests.bench`."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil  # type: ignore[import-untyped]

from server.api.auth import issue_development_token
from server.services.product_cache import CHANNEL as PRODUCT_CHANGES
from tests.bench.checks import CheckResult, check, mark
from tests.bench.config import (
    CUSTOMER_SUBJECTS,
    HALF_RATE_FRACTION,
    HALF_RATE_P99_TARGET_MS,
    JWT_SECRET_BYTES,
    REPO_ROOT,
    BenchConfig,
)
from tests.bench.grpc_load import LoadResult, run_grpc_load
from tests.bench.pgbench import order_sql, run_pgbench, script
from tests.bench.report import (
    Row,
    format_table,
    link_baselines,
    notes,
    percentile,
    write_json,
)
from tests.bench.stack import (
    Database,
    EnvoyProcess,
    ServerProcess,
    bench_database,
    start_bare_server,
    start_bench_envoy,
    start_bench_server,
    tree_cpu_by_process,
    tree_cpu_seconds,
    tree_rss_mb,
)
from tests.bench.wrk import ensure_wrk, run_wrk

BASELINES = {
    "noop": "grpc-bare",
    "catalog-read": "noop",
    "order-spread": "pgbench:order-spread",
    "flash-sale@64": "pgbench:flash-sale@64",
    "flash-sale@256": "pgbench:flash-sale@256",
    "rest": "order-spread",
}
TOKEN_LIFETIME_SECONDS = 4 * 3600
REST_HALF_RATE_NOTE = (
    "wrk has no fixed-rate (open-loop) mode and wrk2, which has, is not installed"
    " (no Debian package)"
)

T = TypeVar("T")


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


def _machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    # /proc/stat's user already includes guest time; idle, iowait and steal are not ours.
    return float(
        times.user
        + times.nice
        + times.system
        + getattr(times, "irq", 0.0)
        + getattr(times, "softirq", 0.0)
    )


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, config: BenchConfig, scratch: Path) -> None:
        self.config = config
        self.scratch = scratch
        self.secret = secrets.token_urlsafe(JWT_SECRET_BYTES)
        self.tokens = tuple(
            issue_development_token(
                self.secret,
                f"bench-customer-{number:03d}",
                ["customer"],
                lifetime_seconds=TOKEN_LIFETIME_SECONDS,
            )
            for number in range(CUSTOMER_SUBJECTS)
        )
        self.rows: list[Row] = []
        self.baselines = dict(BASELINES)
        self.order_sql = order_sql()
        self.database: Database | None = None
        self.server: ServerProcess | None = None
        self.envoy: EnvoyProcess | None = None

    # --- plumbing ---------------------------------------------------------------------------

    @property
    def db(self) -> Database:
        assert self.database is not None
        return self.database

    def sample(self, generator_pids: list[int]) -> CpuSample:
        server, envoy = self.server, self.envoy
        server_by_process = tree_cpu_by_process(server.process.pid) if server else {}
        return CpuSample(
            time=time.monotonic(),
            generator=sum(tree_cpu_seconds(pid) for pid in generator_pids),
            server=sum(server_by_process.values()) if server else None,
            server_by_process=server_by_process,
            envoy=tree_cpu_seconds(envoy.process.pid) if envoy else None,
            postgres=(tree_cpu_seconds(self.db.postmaster_pid) if self.db.postmaster_pid else None),
            server_rss_mb=tuple(tree_rss_mb(server.process.pid)) if server else (),
            machine_busy=_machine_busy_seconds(),
        )

    def start_server(self, workers: int, settings: Mapping[str, str] | None = None) -> None:
        """The server with `workers` processes and any other `settings` (environment)."""
        extra = dict(settings or {})
        shown = " ".join(f"{name}={value}" for name, value in extra.items())
        progress(f"starting the server (SERVER_WORKERS={workers} {shown}) ...")
        self.server = start_bench_server(
            self.db,
            secret=self.secret,
            workers=workers,
            pool_size=self.config.db_pool_size,
            max_overflow=self.config.db_max_overflow,
            log_path=self.scratch / f"server-{workers}{'-'.join(['', *extra.values()])}.log",
            settings=extra,
        )

    def running_server(self) -> ServerProcess:
        """The server, which must still be running: a scenario against a dead server would
        only measure connection errors."""
        server = self.server
        assert server is not None
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the server exited with {server.process.returncode}; its log ends with:\n"
                + server.log_tail()
            )
        return server

    def stop_server(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
            self.envoy = None
        if self.server is not None:
            server, self.server = self.server, None
            server.stop()
            if server.process.returncode not in (0, -signal.SIGTERM):
                progress(
                    f"the server exited with {server.process.returncode}; its log ends with:\n"
                    + server.log_tail()
                )

    def announce_product_changes(self, on: bool) -> None:
        with self.db.connect() as conn:
            verb = "ENABLE" if on else "DISABLE"
            conn.execute(f"ALTER TABLE products {verb} TRIGGER products_updated_notify")
            if on:
                conn.execute("SELECT pg_notify(%s, '*')", (PRODUCT_CHANGES,))

    def checkpoint(self) -> None:
        """Starts every write scenario from clean buffers, so no scenario inherits a
        checkpoint triggered by the one before."""
        with contextlib.suppress(Exception), self.db.connect() as conn:
            conn.execute("CHECKPOINT")

    def add_row(
        self,
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
            cpu_server_s=_delta(last.server, first.server) if server_workers else None,
            cpu_envoy_s=_delta(last.envoy, first.envoy) if tool == "wrk" else None,
            cpu_postgres_s=_delta(last.postgres, first.postgres),
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
        self.rows.append(row)
        p99 = "-" if row.p99_ms is None else f"{row.p99_ms:.1f}"
        progress(
            f"  {scenario}: {row.throughput:.0f}/s, p99 {p99} ms, {row.errors} errors,"
            f" check {row.check} ({row.check_detail})"
        )
        return row

    # --- scenarios --------------------------------------------------------------------------

    def grpc_scenario(self, scenario: str, kind: str, concurrency: int) -> None:
        config, server = self.config, self.running_server()
        progress(
            f"{scenario}: {concurrency} gRPC clients over {config.generator_processes}"
            f" processes, {config.warmup:g} s warm-up + {config.seconds:g} s ..."
        )
        with self.profiling(scenario, server, config.warmup + config.seconds):
            load, first, last, result = self.checked_grpc_load(
                kind, concurrency, warmup=config.warmup, seconds=config.seconds, sample=self.sample
            )
        row = self.add_row(
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
        if config.half_seconds > 0 and row.throughput > 0:
            self.half_rate(row, kind)

    @contextlib.contextmanager
    def profiling(self, scenario: str, server: ServerProcess, seconds: float) -> Iterator[None]:
        """With BENCH_PROFILE set, py-spy samples each server worker while the load runs."""
        if self.config.profile_dir is None:
            yield
            return
        directory = Path(self.config.profile_dir).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        root = psutil.Process(server.process.pid)
        # SERVER_WORKERS=1 serves in the supervisor's own process; otherwise its children.
        workers = root.children() or [root]
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

    def checked_grpc_load(
        self,
        kind: str,
        concurrency: int,
        *,
        warmup: float,
        seconds: float,
        sample: Callable[[list[int]], T],
        rate: float = 0.0,
    ) -> tuple[LoadResult, T, T, CheckResult]:
        """One gRPC load run followed by its invariant check (orders counted for orders)."""
        config, server = self.config, self.running_server()
        orders = kind in ("order-spread", "flash-sale")
        if orders:
            self.checkpoint()
        before = mark(self.db)
        load, first, last = run_grpc_load(
            kind=kind,
            target=server.target,
            concurrency=concurrency,
            tokens=self.tokens,
            processes=config.generator_processes,
            channels_per_process=config.channels_per_process,
            event_loop=config.generator_event_loop,
            warmup=warmup,
            seconds=seconds,
            sample=sample,
            rate=rate,
        )
        result = check(self.db, before, client_successes=load.ok_total if orders else 0)
        return load, first, last, result

    def half_rate(self, row: Row, kind: str) -> None:
        """The same scenario open loop at HALF_RATE_FRACTION of the throughput `row` reached;
        its latency and its own invariant check go into `row`."""
        config = self.config
        rate = row.throughput * HALF_RATE_FRACTION
        progress(
            f"{row.scenario} at half rate: open loop, {rate:.0f} calls/s over"
            f" {config.generator_processes} processes,"
            f" {config.half_warmup:g} s warm-up + {config.half_seconds:g} s ..."
        )
        # Orders of this run are checked on their own: the database must hold exactly the
        # closed-loop run's orders plus these.
        load, first, last, result = self.checked_grpc_load(
            kind,
            row.concurrency,
            warmup=config.half_warmup,
            seconds=config.half_seconds,
            sample=self.sample,
            rate=rate,
        )
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
        row.half_cpu_server_s = _delta(last.server, first.server)
        row.half_cpu_postgres_s = _delta(last.postgres, first.postgres)
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
        p99 = "-" if row.half_p99_ms is None else f"{row.half_p99_ms:.1f}"
        progress(
            f"  {row.scenario} at half rate: {row.half_throughput:.0f}/s of {rate:.0f}/s"
            f" offered, p99 {p99} ms ({'met' if row.half_p99_met else 'MISSED'}),"
            f" {row.half_errors} errors, check {result.label} ({result.detail})"
        )

    def pgbench_scenario(self, scenario: str, kind: str, clients: int) -> None:
        config = self.config
        # The server's pool stays connected meanwhile; keep room for it.
        room = (
            self.db.max_connections
            - 10
            - max(config.server_workers, config.compare_workers)
            * (config.db_pool_size + config.db_max_overflow)
        )
        if clients > room:
            progress(f"{scenario}: skipped, max_connections={self.db.max_connections} too low")
            return
        progress(
            f"{scenario}: pgbench -M prepared, {clients} clients,"
            f" {config.warmup:g} s warm-up + {config.seconds:g} s ..."
        )
        self.checkpoint()
        before = mark(self.db)
        saved_server, self.server = self.server, None  # idle: not part of this measurement
        # pgbench commits each order on its own: the product-change NOTIFY (migration 0004)
        # would serialise those commits (20-28% fewer orders/s measured) and slow the
        # baseline, not the database's limit for the order SQL. Off while it runs; then
        # every server process is told that everything changed.
        self.announce_product_changes(False)
        try:
            run, first, last = run_pgbench(
                self.db,
                kind=kind,
                sql=self.order_sql,
                clients=clients,
                threads=config.pgbench_threads,
                warmup=config.warmup,
                seconds=config.seconds,
                scratch=self.scratch,
                sample=self.sample,
            )
        finally:
            self.announce_product_changes(True)
            self.server = saved_server
        result = check(self.db, before, client_successes=run.load.ok_total)
        self.add_row(
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
                "pgbench_sql_source": self.order_sql.source,
                "pgbench_script": script(kind, self.order_sql),
            },
        )

    def bare_grpc_scenario(self, scenario: str, concurrency: int) -> None:
        """`noop` against a bare grpc.aio server instead of ours: grpc.aio's own cost per
        call here, which no change to our code can go below (the main server idles)."""
        saved, bare = (
            self.server,
            start_bare_server(self.config.server_workers, self.scratch / "bare-server.log"),
        )
        self.server = bare
        try:
            self.grpc_scenario(scenario, "noop", concurrency)
        finally:
            self.server = saved
            bare.stop()

    def rest_scenario(self, scenario: str, concurrency: int) -> None:
        config, server = self.config, self.running_server()
        wrk = ensure_wrk()
        if wrk is None:
            progress(f"{scenario}: skipped, wrk is not installed and cannot be installed here")
            return
        if self.envoy is None:
            self.envoy = start_bench_envoy(server.grpc_port, self.scratch)
        progress(
            f"{scenario}: wrk, {concurrency} connections through Envoy,"
            f" {config.warmup:g} s warm-up + {config.seconds:g} s ..."
        )
        self.checkpoint()
        before = mark(self.db)
        run, first, last = run_wrk(
            wrk,
            base_url=f"http://127.0.0.1:{self.envoy.http_port}",
            tokens=self.tokens[:concurrency],
            connections=concurrency,
            threads=config.wrk_threads,
            warmup=config.warmup,
            seconds=config.seconds,
            scratch=self.scratch,
            sample=self.sample,
        )
        result = check(
            self.db,
            before,
            client_successes=run.ok_total,
            client_unknown=run.unanswered_total,
        )
        measured = run.measured
        row = self.add_row(
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
        if config.half_seconds > 0:
            row.half_note = REST_HALF_RATE_NOTE

    def run(self) -> None:
        config = self.config
        wants = config.wants
        concurrency = config.concurrency
        low, high = config.flash_sale_concurrency
        self.start_server(config.server_workers)
        if wants("grpc-bare"):
            self.bare_grpc_scenario("grpc-bare", concurrency)
        if wants("noop"):
            self.grpc_scenario("noop", "noop", concurrency)
        if wants("catalog-read"):
            self.grpc_scenario("catalog-read", "catalog-read", concurrency)
        if wants("pgbench:order-spread"):
            self.pgbench_scenario("pgbench:order-spread", "order-spread", concurrency)
        if wants("order-spread"):
            self.grpc_scenario("order-spread", "order-spread", concurrency)
        for clients in (low, high):
            if wants(f"pgbench:flash-sale@{clients}"):
                self.pgbench_scenario(f"pgbench:flash-sale@{clients}", "flash-sale", clients)
            if wants(f"flash-sale@{clients}"):
                self.grpc_scenario(f"flash-sale@{clients}", "flash-sale", clients)
        if wants("rest"):
            self.rest_scenario("rest", concurrency)
        if wants("order-spread:workers"):
            self.stop_server()
            self.start_server(config.compare_workers)
            name = f"order-spread:workers={config.compare_workers}"
            self.baselines[name] = "order-spread"
            self.grpc_scenario(name, "order-spread", concurrency)
        if wants("catalog-read:uncached"):
            # The same reads with the product cache off: every GetProduct a database lookup.
            self.stop_server()
            self.start_server(config.server_workers, {"PRODUCT_CACHE_SIZE": "0"})
            self.baselines["catalog-read:uncached"] = "noop"
            self.grpc_scenario("catalog-read:uncached", "catalog-read", concurrency)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C and `kill` both stop everything, even where SIGINT was inherited ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    config = BenchConfig()
    cores = os.cpu_count() or 1
    output = Path(config.output)
    if not output.is_absolute():
        output = REPO_ROOT / output
    started = time.monotonic()
    load_average = os.getloadavg()[0]
    failure: str | None = None
    with tempfile.TemporaryDirectory(prefix="marketplace-bench-") as scratch_name:
        bench = Bench(config, Path(scratch_name))
        progress(
            f"Marketplace bench: {cores} cores (load average {load_average:.2f}),"
            f" scratch {scratch_name}"
        )
        try:
            with bench_database(bench.scratch, config.database_url) as database:
                bench.database = database
                progress("database ready: 10,000 products + 1 flash-sale product seeded")
                if database.postmaster_pid is None:
                    progress("PostgreSQL is not on this machine: its CPU is not measured")
                try:
                    bench.run()
                except Exception:
                    # Report what was measured; everything is stopped on the way out.
                    failure = traceback.format_exc()
                finally:
                    bench.stop_server()
        except KeyboardInterrupt:
            progress("\ninterrupted; everything was stopped")
            return 130
    if failure is not None:
        progress(f"\nthe bench stopped early:\n{failure}")
    rows = bench.rows
    if not rows:
        return 1
    link_baselines(rows, bench.baselines)
    print()
    print(
        f"Marketplace bench, {time.strftime('%Y-%m-%d %H:%M')}, {cores} cores,"
        f" {config.warmup:g} s warm-up + {config.seconds:g} s measured per scenario"
        + (
            f" (+ {config.half_warmup:g} s + {config.half_seconds:g} s at half rate)"
            if config.half_seconds > 0
            else ""
        )
        + f" ({time.monotonic() - started:.0f} s in all)"
    )
    print(format_table(rows))
    for note in notes(rows, cores):
        print(f"  * {note}")
    if any(row.tool == "pgbench" for row in rows):
        print(f"  * pgbench ran the order statements from {bench.order_sql.source}")
    write_json(output, rows, config, load_average_at_start=load_average)
    print(f"written to {output}")
    return 0 if failure is None and all(row.check == "ok" for row in rows) else 1
