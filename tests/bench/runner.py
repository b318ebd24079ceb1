"""Runs every scenario against one stack and reports: config -> scenarios -> report.
Entry point: `python -m tests.bench`."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
import traceback
from pathlib import Path

from devstack.processes import free_port
from tests.bench.config import REPO_ROOT, BenchConfig
from tests.bench.harness import Bench
from tests.bench.progress import progress
from tests.bench.report import (
    format_table,
    link_baselines,
    link_outbox_comparisons,
    notes,
    write_json,
)
from tests.bench.scenarios import (
    bare_grpc_scenario,
    fleet_scenario,
    grpc_scenario,
    pgbench_scenario,
    rest_scenario,
)
from tests.bench.stack import bench_database, bench_nats

# The row each scenario's throughput is compared with.
BASELINES = {
    "noop": "grpc-bare",
    "catalog-read": "noop",
    "order-spread": "pgbench:order-spread",
    "flash-sale@64": "pgbench:flash-sale@64",
    "flash-sale@256": "pgbench:flash-sale@256",
    "rest": "order-spread",
    # The same runs without events, against the same baselines; the events' own cost is
    # OUTBOX_COMPARISONS' ratio (report.link_outbox_comparisons).
    "order-spread:no-outbox": "pgbench:order-spread",
    "flash-sale@64:no-outbox": "pgbench:flash-sale@64",
    "flash-sale@256:no-outbox": "pgbench:flash-sale@256",
    # What Envoy in front costs (same server processes), then what a second replica does.
    "fleet:1": "order-spread",
    "fleet:2": "fleet:1",
}
# A scenario with events -> the same without (OUTBOX_WRITES=false).
OUTBOX_COMPARISONS = {
    "order-spread": "order-spread:no-outbox",
    "flash-sale@64": "flash-sale@64:no-outbox",
    "flash-sale@256": "flash-sale@256:no-outbox",
}


def baselines(config: BenchConfig) -> dict[str, str]:
    """BASELINES and those of the scenarios on a restarted server."""
    return {
        **BASELINES,
        f"order-spread:workers={config.compare_workers}": "order-spread",
        "catalog-read:uncached": "noop",
    }


def run(bench: Bench) -> None:
    """Every scenario config wants, in order: the main server's, then each restart's."""
    config = bench.config
    wants = config.wants
    concurrency = config.concurrency
    low, high = config.flash_sale_concurrency
    bench.start_server(config.server_workers)
    if wants("grpc-bare"):
        bare_grpc_scenario(bench, "grpc-bare", concurrency)
    if wants("noop"):
        grpc_scenario(bench, "noop", "noop", concurrency)
    if wants("catalog-read"):
        grpc_scenario(bench, "catalog-read", "catalog-read", concurrency)
    if wants("pgbench:order-spread"):
        pgbench_scenario(bench, "pgbench:order-spread", "order-spread", concurrency)
    if any(wants(name) for name in OUTBOX_COMPARISONS.values()):
        # Started before pgbench, so the connections it keeps open count against its room.
        bench.start_server_without_events()
    # Each order scenario runs with events, then at once without them on the second server
    # (this machine's speed drifts over minutes: adjacent runs compare best).
    _with_and_without_events(bench, "order-spread", "order-spread", concurrency)
    # Right after order-spread, which fleet:1 is compared with.
    for replicas in (1, 2):
        if wants(name := f"fleet:{replicas}"):
            fleet_scenario(bench, name, replicas, concurrency)
    for clients in (low, high):
        if wants(f"pgbench:flash-sale@{clients}"):
            pgbench_scenario(bench, f"pgbench:flash-sale@{clients}", "flash-sale", clients)
        _with_and_without_events(bench, f"flash-sale@{clients}", "flash-sale", clients)
    if wants("rest"):
        rest_scenario(bench, "rest", concurrency)
    if wants("order-spread:workers"):
        bench.stop_server()
        bench.start_server(config.compare_workers)
        name = f"order-spread:workers={config.compare_workers}"
        grpc_scenario(bench, name, "order-spread", concurrency)
    if wants("catalog-read:uncached"):
        # The same reads with the product cache off: every GetProduct a database lookup.
        bench.stop_server()
        bench.start_server(config.server_workers, {"PRODUCT_CACHE_SIZE": "0"})
        grpc_scenario(bench, "catalog-read:uncached", "catalog-read", concurrency)


def _with_and_without_events(bench: Bench, name: str, kind: str, concurrency: int) -> None:
    """`name` and `name:no-outbox`, each wanted, then config.event_rounds - 1 more rounds
    of the pair (rows `name#2`, ...; no half-rate runs), every other round without events
    first, so neither side always runs on a machine the other has just warmed or tired."""
    wanted = [events for events in (True, False) if bench.config.wants(_named(name, events))]
    rounds = bench.config.event_rounds if len(wanted) == 2 else 1
    for round_number in range(1, rounds + 1):
        suffix = "" if round_number == 1 else f"#{round_number}"
        for events in wanted if round_number % 2 else wanted[::-1]:
            scenario = _named(name, events) + suffix
            with contextlib.nullcontext() if events else bench.serving_without_events():
                grpc_scenario(bench, scenario, kind, concurrency, half_rate=round_number == 1)


def _named(name: str, events: bool) -> str:
    return name if events else f"{name}:no-outbox"


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
            with (
                bench_database(bench.scratch, config.database_url) as database,
                bench_nats(bench.scratch) if config.relay else contextlib.nullcontext() as nats,
            ):
                bench.database = database
                # Without one, the server's NATS_URL points nowhere: events stay in the outbox.
                bench.nats_url = nats or f"nats://127.0.0.1:{free_port()}"
                progress("database ready: 10,000 products + 1 flash-sale product seeded")
                if database.postmaster_pid is None:
                    progress("PostgreSQL is not on this machine: its CPU is not measured")
                try:
                    run(bench)
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
    link_baselines(rows, baselines(config))
    link_outbox_comparisons(rows, OUTBOX_COMPARISONS)
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
