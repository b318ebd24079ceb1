"""Settings of one benchmark run (environment variables) and the seeded catalog's shape."""

from __future__ import annotations

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
CUSTOMER_SUBJECTS = 256  # one token per client at the highest concurrency

SCENARIO_NAMES = (
    "noop",
    "catalog-read",
    "pgbench:order-spread",
    "order-spread",
    "pgbench:flash-sale@64",
    "flash-sale@64",
    "pgbench:flash-sale@256",
    "flash-sale@256",
    "rest",
    "order-spread:workers",
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


@dataclass(frozen=True)
class BenchConfig:
    """Read from the environment; every field lands in bench-results.json."""

    seconds: float = field(default_factory=lambda: _float("BENCH_SECONDS", 10.0, 1.0))
    warmup: float = field(default_factory=lambda: _float("BENCH_WARMUP", 3.0, 0.0))
    database_url: str | None = field(
        default_factory=lambda: os.environ.get("BENCH_DATABASE_URL") or None
    )
    generator_processes: int = field(default_factory=lambda: _int("BENCH_GENERATOR_PROCESSES", 2))
    channels_per_process: int = field(default_factory=lambda: _int("BENCH_CHANNELS_PER_PROCESS", 4))
    concurrency: int = field(default_factory=lambda: _int("BENCH_CLIENTS", 64))
    flash_sale_concurrency: tuple[int, ...] = (64, 256)
    server_workers: int = field(default_factory=lambda: _int("BENCH_SERVER_WORKERS", 1))
    compare_workers: int = field(default_factory=lambda: _int("BENCH_COMPARE_WORKERS", 2))
    db_pool_size: int = field(default_factory=lambda: _int("BENCH_DB_POOL_SIZE", 20))
    db_max_overflow: int = field(
        default_factory=lambda: _int("BENCH_DB_MAX_OVERFLOW", 20, minimum=0)
    )
    pgbench_threads: int = field(default_factory=lambda: _int("BENCH_PGBENCH_THREADS", 2))
    wrk_threads: int = field(default_factory=lambda: _int("BENCH_WRK_THREADS", 2))
    output: str = field(
        default_factory=lambda: os.environ.get("BENCH_OUTPUT", "bench-results.json")
    )
    # Comma-separated subset of SCENARIO_NAMES (development); empty runs them all.
    only: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            name.strip() for name in os.environ.get("BENCH_ONLY", "").split(",") if name.strip()
        )
    )

    def __post_init__(self) -> None:
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
