"""The hot-path pool's connections keep one cursor per statement (server/db/driver.py)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg.rows import namedtuple_row

from server.db.driver import DriverPool, HotConnection
from tests.conftest import hot_path_pool, insert_product

pytestmark = pytest.mark.integration

_SQUARES = "SELECT n, n * n AS square FROM generate_series(1, %(up_to)s) AS n"
_ONE = "SELECT 1"


async def test_a_statement_runs_again_on_its_own_cursor_with_fresh_results(
    hot_path: DriverPool,
) -> None:
    async with hot_path.connection() as driver:
        assert isinstance(driver, HotConnection)
        first = await driver.execute_reusing_cursor(
            _SQUARES, {"up_to": 2}, row_factory=namedtuple_row
        )
        assert [row.square for row in await first.fetchall()] == [1, 4]
        other = await driver.execute_reusing_cursor(_ONE)
        assert other is not first
        assert await other.fetchall() == [(1,)]

        again = await driver.execute_reusing_cursor(
            _SQUARES, {"up_to": 3}, row_factory=namedtuple_row
        )
        assert again is first, "the statement's cursor is kept, with its adaptation state"
        assert [row.square for row in await again.fetchall()] == [1, 4, 9]
        as_tuples = await driver.execute_reusing_cursor(_SQUARES, {"up_to": 1})
        assert as_tuples is not first, "another row factory is another cursor"
        assert await as_tuples.fetchall() == [(1, 1)]


async def test_a_transaction_left_idle_is_ended_and_its_row_locks_released(
    database_url: str,
) -> None:
    """The order batch waits "idle in transaction" between its round trips; a process that
    froze there must not hold its products' row locks for longer than a statement may
    take (server/db/driver.py)."""
    product_id = insert_product(database_url, stock=1)
    async with (
        hot_path_pool(database_url, size=1, statement_timeout_ms=300) as pool,
        pool.connection() as frozen,
    ):
        await frozen.execute("BEGIN")
        await frozen.execute("SELECT id FROM products WHERE id = %s FOR UPDATE", (product_id,))
        await asyncio.sleep(1.5)  # frozen mid-batch, the lock taken
        # Free for another session, although this one never rolled back or hung up.
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("SET lock_timeout = '1s'")
            other.execute("SELECT id FROM products WHERE id = %s FOR UPDATE", (product_id,))
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            await frozen.execute("SELECT 1")
        # So the pool discards it and the caller gets UNAVAILABLE (server/api/errors.py).
        assert frozen.closed or frozen.broken
