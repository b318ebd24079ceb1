"""The order batch alone: CPU per order of `OrderPlacement.place_orders` at several batch sizes,
with no gRPC and no other load, on the bench's seeded database.

    .venv/bin/python -m tests.bench.order_batch [batch sizes, default 1 5 20]

For changes to the order transaction whose effect the full benchmark's noise would hide.
Prints this process's CPU per order and per batch, PostgreSQL's (the embedded server's
processes, so only with the embedded database) and the wall time per batch. Each size runs
three times after a warm-up; compare the best of them between two commits.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import uvloop

from server.domain.identity import Customer
from server.domain.orders import OrderRequest, order_request
from server.services.orders.placement import OrderPlacement
from tests.bench.config import PRODUCT_COUNT, product_id
from tests.bench.stack import bench_database, tree_cpu_seconds
from tests.conftest import hot_path_pool, sqlalchemy_engine

ORDERS_PER_RUN = 2000
RUNS = 3


def order_batches(
    size: int, count: int, rng: random.Random
) -> list[list[tuple[Customer, OrderRequest]]]:
    """Like order-spread: 1-3 distinct random products, one unit each, fresh request ids."""
    return [
        [
            (
                Customer(f"customer-{rng.randrange(1000)}"),
                order_request(
                    os.urandom(8).hex(),
                    [
                        (product_id(n), 1)
                        for n in rng.sample(range(1, PRODUCT_COUNT + 1), rng.randint(1, 3))
                    ],
                ),
            )
            for _ in range(size)
        ]
        for _ in range(count)
    ]


async def _measure(url: str, postmaster_pid: int | None, sizes: list[int]) -> None:
    engine = sqlalchemy_engine(url, pool_size=2)
    try:
        async with hot_path_pool(url, size=2) as pool:
            await _measure_sizes(OrderPlacement(engine, pool), postmaster_pid, sizes)
    finally:
        await engine.dispose()


async def _measure_sizes(
    orders: OrderPlacement, postmaster_pid: int | None, sizes: list[int]
) -> None:
    rng = random.Random(1)
    me = psutil.Process()
    for size in sizes:
        count = max(1, ORDERS_PER_RUN // size)
        for batch in order_batches(size, 20, rng):  # warm-up: connections, prepared statements
            await orders.place_orders(batch)
        for run in range(1, RUNS + 1):
            batches = order_batches(size, count, rng)
            cpu, wall = me.cpu_times(), time.perf_counter()
            postgres = tree_cpu_seconds(postmaster_pid) if postmaster_pid else None
            for batch in batches:
                await orders.place_orders(batch)
            wall = time.perf_counter() - wall
            used = sum(me.cpu_times()[:2]) - sum(cpu[:2])
            placed = size * count
            line = (
                f"batch of {size:>3}, run {run}: {used / placed * 1e6:6.0f} µs CPU per order,"
                f" {used / count * 1e3:5.2f} ms per batch, wall {wall / count * 1e3:5.2f} ms"
                " per batch"
            )
            if postgres is not None and postmaster_pid:
                spent = tree_cpu_seconds(postmaster_pid) - postgres
                line += f"; PostgreSQL {spent / placed * 1e6:5.0f} µs per order"
            print(line, flush=True)


def main() -> int:
    sizes = [int(arg) for arg in sys.argv[1:]] or [1, 5, 20]
    with (
        tempfile.TemporaryDirectory(prefix="marketplace-order-batch-") as scratch,
        bench_database(Path(scratch), os.environ.get("BENCH_DATABASE_URL") or None) as db,
    ):
        uvloop.run(_measure(db.url, db.postmaster_pid, sizes))  # as the server runs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
