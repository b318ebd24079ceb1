"""The hot-path pool's connections keep one cursor per statement (server/db/driver.py)."""

from __future__ import annotations

import pytest
from psycopg.errors import DivisionByZero
from psycopg.rows import namedtuple_row

from server.db.driver import DriverPool, HotConnection
from tests.conftest import insert_product, stock_of

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


# The order transaction (server/services/orders.py) sends no BEGIN or COMMIT: in a pipeline,
# PostgreSQL runs everything up to a Sync as one implicit transaction, and psycopg fetches
# results before that on a flush request. These pin down what it relies on.
_XACT_ID = "SELECT CAST(pg_current_xact_id() AS text)"
_XACT_ID_AGAIN = "SELECT CAST(pg_current_xact_id() AS text) AS again"
_SET_STOCK = "UPDATE products SET stock = %(stock)s WHERE id = %(id)s RETURNING stock"
_FAIL = "SELECT 1 / 0"


async def test_results_fetched_mid_pipeline_leave_its_transaction_open(
    hot_path: DriverPool,
) -> None:
    async with hot_path.connection() as driver:
        async with driver.pipeline():
            first = await driver.execute_reusing_cursor(_XACT_ID)
            [(before_flush,)] = await first.fetchall()  # a flush request: no Sync yet
            second = await driver.execute_reusing_cursor(_XACT_ID_AGAIN)
        [(after_flush,)] = await second.fetchall()
    assert before_flush == after_flush, "both statements ran in one transaction"


async def test_a_failure_after_a_mid_pipeline_fetch_rolls_back_what_came_before(
    hot_path: DriverPool, database_url: str
) -> None:
    product_id = insert_product(database_url, stock=5)

    async def update_then_fail(driver: HotConnection) -> None:
        async with driver.pipeline():
            update = await driver.execute_reusing_cursor(_SET_STOCK, {"stock": 1, "id": product_id})
            assert await update.fetchall() == [(1,)]  # answered, not committed
            await driver.execute_reusing_cursor(_FAIL)

    async with hot_path.connection() as driver:
        with pytest.raises(DivisionByZero):
            await update_then_fail(driver)
    assert stock_of(database_url, product_id) == 5
