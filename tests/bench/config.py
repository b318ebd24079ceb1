"""Settings of one benchmark run and the seeded catalog's shape.

Environment variables (all optional):
  BENCH_SECONDS / BENCH_WARMUP     measured / warm-up seconds per scenario (10 / 3)
  BENCH_HALF_SECONDS / BENCH_HALF_WARMUP
                                   measured / warm-up seconds of the open-loop run at half
                                   of each gRPC scenario's throughput (5 / 1; 0 s: skip it)
  BENCH_DATABASE_URL               a PostgreSQL server to create the throwaway database on
                                   (default: an embedded one from pgserver)
  BENCH_SERVER_WORKERS             SERVER_WORKERS of the main scenarios (default: cores)
  BENCH_COMPARE_WORKERS            SERVER_WORKERS of the extra order-spread run (1)
  BENCH_CLIENTS                    clients of noop, catalog-read, order-spread, rest (64)
  BENCH_GENERATOR_PROCESSES        gRPC generator processes (2)
  BENCH_CHANNELS_PER_PROCESS       gRPC connections per generator process (8)
  BENCH_EVENT_LOOP                 the generator's loop: uvloop (default) or asyncio
  BENCH_DB_POOL_SIZE / BENCH_DB_MAX_OVERFLOW   the server's pool per process (20 / 20)
  BENCH_PGBENCH_THREADS / BENCH_WRK_THREADS    their -j / -t (2 / 2)
  BENCH_OUTPUT                     the JSON report (bench-results.json in the repository)
  BENCH_ONLY                       comma-separated scenario names, for development
  BENCH_RELAY                      1 (default): a nats-server the outbox relay publishes to;
                                   0: none, so events stay in the outbox (the writes alone)
  BENCH_EVENT_ROUNDS               rounds of each order scenario with and without events (3)

order-spread and flash-sale each run again at once on a second server with
OUTBOX_WRITES=false (the `:no-outbox` rows): the order transaction without its events,
measured in the same run, so the report can say what writing (and publishing) them costs.
One such pair moves by 10-20% from run to run here, so the pair runs BENCH_EVENT_ROUNDS
times, alternating which goes first (rounds after the first are the `#2`, `#3` rows), and
the events' cost is judged on the median of the rounds' ratios.
`fleet:1` and `fleet:2` send the order-spread load through Envoy to one and to two server
replicas (scenarios.fleet_scenario says how many processes each replica has, and why).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

PRODUCT_COUNT = 10_000
# The flash-sale product: one more id after the 10,000 spread products.
HOT_PRODUCT_N = PRODUCT_COUNT + 1
REPO_ROOT = Path(__file__).resolve().parents[2]
INITIAL_STOCK = 1_000_000_000
CURRENCY = "USD"
JWT_SECRET_BYTES = 48
CORES = os.cpu_count() or 1
CUSTOMER_SUBJECTS = 256  # one token per client at the highest concurrency
# After its closed-loop run, every gRPC scenario runs open loop at this fraction of the
# throughput it reached, and its p99 there is held against this target.
HALF_RATE_FRACTION = 0.5
HALF_RATE_P99_TARGET_MS = 25.0

SCENARIO_NAMES = (
    "grpc-bare",
    "noop",
    "catalog-read",
    "pgbench:order-spread",
    "order-spread",
    "order-spread:no-outbox",
    "fleet:1",
    "fleet:2",
    "pgbench:flash-sale@64",
    "flash-sale@64",
    "flash-sale@64:no-outbox",
    "pgbench:flash-sale@256",
    "flash-sale@256",
    "flash-sale@256:no-outbox",
    "rest",
    "order-spread:workers",
    "catalog-read:uncached",
)


def product_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def product_sku(n: int) -> str:
    return f"BENCH-{n:06d}"


def product_price(n: int) -> Decimal:
    """Deterministic, so the pgbench scripts can name the price a row holds."""
    return Decimal(n % 100) + Decimal("0.99")


def _int(name: str, default: int, minimum: int = 1) -> int:
    value = int(os.environ.get(name, default))
    if value < minimum:
        raise SystemExit(f"{name} must be at least {minimum}")
    return value


def _float(name: str, default: float, minimum: float) -> float:
    value = float(os.environ.get(name, default))
    if value < minimum:
        raise SystemExit(f"{name} must be at least {minimum}")
    return value


def _default_event_loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


@dataclass(frozen=True)
class BenchConfig:
    """Read from the environment; every field lands in bench-results.json."""

    seconds: float = field(default_factory=lambda: _float("BENCH_SECONDS", 10.0, 1.0))
    warmup: float = field(default_factory=lambda: _float("BENCH_WARMUP", 3.0, 0.0))
    half_seconds: float = field(default_factory=lambda: _float("BENCH_HALF_SECONDS", 5.0, 0.0))
    half_warmup: float = field(default_factory=lambda: _float("BENCH_HALF_WARMUP", 1.0, 0.0))
    event_rounds: int = field(default_factory=lambda: _int("BENCH_EVENT_ROUNDS", 3))
    database_url: str | None = field(
        default_factory=lambda: os.environ.get("BENCH_DATABASE_URL") or None
    )
    generator_processes: int = field(default_factory=lambda: _int("BENCH_GENERATOR_PROCESSES", 2))
    # Server workers share the port through SO_REUSEPORT, which assigns whole connections:
    # 16 connections split fairly evenly, and more cost both sides CPU per call.
    channels_per_process: int = field(default_factory=lambda: _int("BENCH_CHANNELS_PER_PROCESS", 8))
    # uvloop costs the generator about a quarter less CPU per call than asyncio's loop.
    generator_event_loop: str = field(
        default_factory=lambda: os.environ.get("BENCH_EVENT_LOOP", _default_event_loop())
    )
    concurrency: int = field(default_factory=lambda: _int("BENCH_CLIENTS", 64))
    flash_sale_concurrency: tuple[int, ...] = (64, 256)
    # The main scenarios run the server's default (one process per core); order-spread runs
    # once more with BENCH_COMPARE_WORKERS processes.
    server_workers: int = field(default_factory=lambda: _int("BENCH_SERVER_WORKERS", CORES))
    compare_workers: int = field(
        default_factory=lambda: _int("BENCH_COMPARE_WORKERS", 1 if CORES > 1 else 2)
    )
    db_pool_size: int = field(default_factory=lambda: _int("BENCH_DB_POOL_SIZE", 20))
    db_max_overflow: int = field(
        default_factory=lambda: _int("BENCH_DB_MAX_OVERFLOW", 20, minimum=0)
    )
    pgbench_threads: int = field(default_factory=lambda: _int("BENCH_PGBENCH_THREADS", 2))
    wrk_threads: int = field(default_factory=lambda: _int("BENCH_WRK_THREADS", 2))
    output: str = field(
        default_factory=lambda: os.environ.get("BENCH_OUTPUT", "bench-results.json")
    )
    # A directory: py-spy records every server worker during each gRPC scenario's load and
    # writes one speedscope profile per worker there. Sampling costs CPU, so figures from a
    # profiled run are for finding hot spots, not for the table.
    profile_dir: str | None = field(default_factory=lambda: os.environ.get("BENCH_PROFILE") or None)
    # Whether the server's outbox relay has a NATS to publish the events to.
    relay: bool = field(default_factory=lambda: os.environ.get("BENCH_RELAY", "1") != "0")
    # Comma-separated subset of SCENARIO_NAMES (development); empty runs them all.
    only: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            name.strip() for name in os.environ.get("BENCH_ONLY", "").split(",") if name.strip()
        )
    )

    def __post_init__(self) -> None:
        if self.generator_event_loop not in ("uvloop", "asyncio"):
            raise SystemExit("BENCH_EVENT_LOOP must be uvloop or asyncio")
        unknown = set(self.only) - set(SCENARIO_NAMES)
        if unknown:
            raise SystemExit(f"BENCH_ONLY: unknown scenarios {sorted(unknown)}")

    def wants(self, name: str) -> bool:
        return not self.only or name in self.only

    def public(self) -> dict[str, Any]:
        """The settings for the JSON report, without credentials in the database URL."""
        settings = asdict(self)
        settings["database_url"] = "BENCH_DATABASE_URL" if self.database_url else "embedded"
        return settings
