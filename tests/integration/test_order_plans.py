"""The order transaction's statements keep using indexes as the orders table grows.

psycopg prepares a statement once it has run five times. PostgreSQL, left to itself
(plan_cache_mode=auto), plans it for its parameters five more times and may then settle on
a generic plan made for the table as it was, kept until an ANALYZE of the table (autovacuum's,
a minute or more later) or the connection's end. A server started on an empty orders table,
as every new marketplace is, would then look request ids up with a sequential scan of all
orders, in every batch, while holding the batch's product locks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from devstack.postgres import create_database, drop_database
from server.db.driver import DriverPool
from server.domain.orders import OrderStatus, order_request
from server.services.orders.placement import OrderPlacement
from tests.conftest import hot_path_pool, insert_product, sqlalchemy_engine

pytestmark = pytest.mark.integration

# Enough that a sequential scan is never what the planner would pick for a lookup by key.
GROWN_TO = 20_000


@pytest.fixture
def empty_database(postgres_server_url: str) -> Iterator[str]:
    with psycopg.connect(postgres_server_url) as conn:
        if conn.info.server_version < 150000:
            pytest.skip("pg_stat_force_next_flush() needs PostgreSQL 15 or later")
    url = create_database(postgres_server_url, "marketplace_plans")
    yield url
    drop_database(postgres_server_url, url)


@pytest.fixture
async def one_connection(empty_database: str) -> AsyncIterator[DriverPool]:
    """One pooled connection, so every order runs on the same cached statements."""
    async with hot_path_pool(empty_database, size=1) as pool:
        yield pool


async def _flush_statistics(pool: DriverPool) -> None:
    """A backend's statistics reach the shared view when it goes idle, at most once a
    second unless told otherwise."""
    async with pool.connection() as driver:
        await driver.execute("SELECT pg_stat_force_next_flush()")


def _orders_scans(url: str) -> tuple[int, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET stats_fetch_consistency = none")
        row = conn.execute(
            "SELECT seq_scan, seq_tup_read FROM pg_stat_user_tables WHERE relname = 'orders'"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _grow_orders(url: str, count: int) -> None:
    """Other customers' orders, straight into the table (test arrangement)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO orders (id, customer_id, request_id, request_fingerprint, status,
                                currency, total, create_time, update_time, expire_time)
            SELECT gen_random_uuid(), 'someone-' || (n %% 1000), 'r-' || n, 'f', 'PAID',
                   'USD', 1, now(), now(), now()
              FROM generate_series(1, %(count)s) AS n
            """,
            {"count": count},
        )


async def test_request_id_lookups_stay_index_probes_after_the_table_grew(
    empty_database: str, one_connection: DriverPool
) -> None:
    engine = sqlalchemy_engine(empty_database, pool_size=1)
    try:
        placement = OrderPlacement(engine, one_connection)
        product = insert_product(empty_database, stock=100)
        # psycopg prepares a statement after five executions, and PostgreSQL plans it for
        # the parameters given five more times before settling: all on a small table.
        for n in range(20):
            placed = await placement.place_order(
                "early", order_request(f"early-{n}", [(product, 1)])
            )
            assert placed.status is OrderStatus.PENDING_PAYMENT
        _grow_orders(empty_database, GROWN_TO)
        await _flush_statistics(one_connection)

        scans_before, rows_before = _orders_scans(empty_database)
        for n in range(3):
            await placement.place_order("late", order_request(f"late-{n}", [(product, 1)]))
        await _flush_statistics(one_connection)
        scans_after, rows_after = _orders_scans(empty_database)

        assert (scans_after - scans_before, rows_after - rows_before) == (0, 0)
    finally:
        await engine.dispose()
