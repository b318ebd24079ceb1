"""The hot-path pool's connections keep one cursor per statement (server/db/driver.py)."""

from __future__ import annotations

import pytest
from psycopg.rows import namedtuple_row

from server.db.driver import DriverPool, HotConnection

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

        again = await driver.execute_reusing_cursor(_SQUARES, {"up_to": 3})
        assert again is first, "the statement's cursor is kept, with its adaptation state"
        assert [row.square for row in await again.fetchall()] == [1, 4, 9]
