"""Two versions of the order transaction in one process, alternating, on the bench's seeded
database: the order placement module (server/services/orders/placement.py) as of a git
revision (A) against the working tree (B).

    .venv/bin/python -m tests.bench.order_ab REVISION [batch sizes, default 1 4 10]

This machine's speed drifts by 10-25% within minutes, more than most changes to the order
path are worth, so runs of two commits one after the other (tests.bench.order_batch) often
cannot tell them apart. Here both versions share the process, the pool and the database,
and take turns in blocks of about 150 orders; each block's client CPU (this process) and
PostgreSQL CPU (the embedded server's processes) are measured, and the report compares the
two versions' blocks. Only the placement module comes from REVISION (which must have it at
the same path): everything it imports is the working tree's, so this compares changes
confined to that file (and what the working tree added that the old file does not use).
"""

from __future__ import annotations

import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import uvloop

from server.domain.identity import Customer
from server.domain.orders import OrderRequest
from server.services.orders import placement
from server.services.orders.placement import OrderPlacement
from tests.bench.order_batch import order_batches
from tests.bench.stack import bench_database, tree_cpu_seconds
from tests.conftest import hot_path_pool, sqlalchemy_engine

ORDERS_PER_SIZE = 6000
ORDERS_PER_BLOCK = 150
_REPO = Path(__file__).resolve().parents[2]
PLACEMENT_PATH = Path(placement.__file__).resolve().relative_to(_REPO).as_posix()


def _orders_module_at(revision: str, scratch: Path) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{revision}:{PLACEMENT_PATH}"],
        cwd=_REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = scratch / "orders_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("orders_at_revision", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


Batch = list[tuple[Customer, OrderRequest]]


def _as_pairs(batch: Batch) -> list[tuple[str, OrderRequest]]:
    return [(customer.id, request) for customer, request in batch]


def _unchanged(batch: Batch) -> Batch:
    return batch


PlaceBatch = Callable[[Batch], Awaitable[Any]]


async def alternate_blocks(
    versions: dict[str, PlaceBatch], postmaster_pid: int, sizes: list[int]
) -> None:
    """For each batch size: every version warmed up, then ORDERS_PER_SIZE orders in blocks
    of about ORDERS_PER_BLOCK, the versions taking turns block by block; prints each
    version's client (this process) and PostgreSQL CPU per batch, and its wall time."""
    rng = random.Random(1)
    for size in sizes:
        for place in versions.values():  # warm-up: connections, statements
            for batch in order_batches(size, 20, rng):
                await place(batch)
        client: dict[str, list[float]] = {name: [] for name in versions}
        postgres: dict[str, list[float]] = {name: [] for name in versions}
        wall: dict[str, list[float]] = {name: [] for name in versions}
        batches = order_batches(size, ORDERS_PER_SIZE // size, rng)
        per_block = max(1, ORDERS_PER_BLOCK // size)
        names = list(versions)
        for number, start in enumerate(range(0, len(batches), per_block)):
            name = names[number % len(names)]
            block = batches[start : start + per_block]
            cpu, pg = time.process_time(), tree_cpu_seconds(postmaster_pid)
            began = time.perf_counter()
            for batch in block:
                await versions[name](batch)
            wall[name].append((time.perf_counter() - began) / len(block))
            client[name].append((time.process_time() - cpu) / len(block))
            postgres[name].append((tree_cpu_seconds(postmaster_pid) - pg) / len(block))
        for name in versions:
            print(
                f"batch of {size:>3}, {name:>8}: client CPU per batch mean"
                f" {statistics.mean(client[name]) * 1e6:6.0f} µs, median"
                f" {statistics.median(client[name]) * 1e6:6.0f} µs; PostgreSQL mean"
                f" {statistics.mean(postgres[name]) * 1e6:6.0f} µs, median"
                f" {statistics.median(postgres[name]) * 1e6:6.0f} µs; wall median"
                f" {statistics.median(wall[name]) * 1e6:6.0f} µs"
                f" ({len(client[name])} blocks)",
                flush=True,
            )


async def _compare(url: str, postmaster_pid: int, old: ModuleType, sizes: list[int]) -> None:
    engine = sqlalchemy_engine(url, pool_size=2)
    try:
        async with hot_path_pool(url, size=2) as pool:
            old_orders = old.OrderPlacement(engine, pool)
            new_orders = OrderPlacement(engine, pool)
            # Before Customer (issue 15), place_orders took (customer id, request) pairs.
            old_batch = _as_pairs if not hasattr(old, "Customer") else _unchanged
            versions: dict[str, PlaceBatch] = {
                "A": lambda batch: old_orders.place_orders(old_batch(batch)),
                "B": new_orders.place_orders,
            }
            await alternate_blocks(versions, postmaster_pid, sizes)
    finally:
        await engine.dispose()


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    revision, sizes = sys.argv[1], [int(arg) for arg in sys.argv[2:]] or [1, 4, 10]
    with tempfile.TemporaryDirectory(prefix="marketplace-order-ab-") as scratch:
        old = _orders_module_at(revision, Path(scratch))
        with bench_database(Path(scratch), os.environ.get("BENCH_DATABASE_URL") or None) as db:
            if db.postmaster_pid is None:
                print("PostgreSQL CPU needs the embedded database", file=sys.stderr)
                return 2
            print(f"A = {PLACEMENT_PATH} at {revision}, B = the working tree", flush=True)
            uvloop.run(_compare(db.url, db.postmaster_pid, old, sizes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
