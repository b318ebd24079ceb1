"""psycopg itself, for the few hot statements: the order transaction and product lookups.

SQLAlchemy costs tens of microseconds of Python per statement (compiling the bind
parameters, building a result object, running event hooks), and its asyncio layer hops
through a greenlet for every checkout, BEGIN, COMMIT and checkin: more CPU per transaction
than the order transaction's two round trips themselves (docs/benchmarks.md). The hot paths
therefore run on psycopg's own pool (psycopg_pool), with psycopg's pipeline mode to send
several statements in one round trip. Everything else stays on SQLAlchemy. Errors come out
as SQLAlchemy's exceptions, so retries and status mapping see one kind of error whichever
layer raised it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import psycopg
from psycopg.pq.abc import PGconn
from psycopg.rows import AsyncRowFactory, tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from server.db.engine import connect_options, libpq_url

_NAMED_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


def psycopg_sql(statement: str) -> str:
    """SQLAlchemy-style `:name` parameters as psycopg's binary `%(name)b` (statements here
    use CAST(... AS ...), never `::`, so a colon before a word is always a parameter).

    Binary, because psycopg's text format checks every array element against a quoting
    regex, which costs measurable CPU per order in large batches (docs/benchmarks.md)."""
    if "%" in statement:
        raise ValueError("a literal % would need escaping for psycopg")
    return _NAMED_PARAMETER.sub(r"%(\1)b", statement)


@contextlib.contextmanager
def sqlalchemy_errors(driver: psycopg.AsyncConnection[Any]) -> Iterator[None]:
    """Re-raises a psycopg error from `driver` as the SQLAlchemy exception SQLAlchemy would
    have raised; a connection that broke is marked invalidated (UNAVAILABLE, retryable)."""
    try:
        yield
    except psycopg.Error as error:
        raise DBAPIError.instance(
            None,
            None,
            error,
            psycopg.Error,
            connection_invalidated=driver.closed or driver.broken,
        ) from error


class HotConnection(psycopg.AsyncConnection[Any]):
    """A hot-path connection that keeps one cursor per statement it runs through
    `execute_reusing_cursor`.

    psycopg keeps a cursor's adaptation state (its Transformer: the dumper chosen for each
    parameter type, array dumpers included) when the same query object runs on that cursor
    again; a new cursor per statement builds it all again, a measurable share of an order
    batch's CPU (docs/benchmarks.md)."""

    def __init__(self, pgconn: PGconn, row_factory: AsyncRowFactory[Any] = tuple_row) -> None:
        super().__init__(pgconn, row_factory)
        self._statement_cursors: dict[
            tuple[str, AsyncRowFactory[Any]], psycopg.AsyncCursor[Any]
        ] = {}

    async def execute_reusing_cursor(
        self,
        statement: str,
        params: Mapping[str, Any] | None = None,
        *,
        prepare: bool | None = None,
        row_factory: AsyncRowFactory[Any] = tuple_row,
    ) -> psycopg.AsyncCursor[Any]:
        """Runs `statement` (a module-level string, so psycopg sees the same query object
        each time) on this connection's cursor for it and `row_factory`.
        A cursor holds its results until it runs again, so read them before the connection
        goes back to the pool."""
        key = (statement, row_factory)
        cursor = self._statement_cursors.get(key)
        if cursor is None:
            cursor = self._statement_cursors[key] = self.cursor(row_factory=row_factory)
        return await cursor.execute(statement, params, prepare=prepare)


class DriverPool:
    """A small pool of autocommit psycopg connections for the hot paths.

    Each group-commit runner holds at most one connection at a time, so a handful per
    process is enough however many calls are in flight. A connection that broke is
    discarded by the pool when it comes back and replaced in the background.
    """

    def __init__(
        self,
        database_url: str,
        *,
        size: int,
        timeout_seconds: float,
        connect_timeout_seconds: int,
        statement_timeout_ms: int,
    ) -> None:
        self._pool: AsyncConnectionPool[HotConnection] = AsyncConnectionPool(
            libpq_url(database_url),
            connection_class=HotConnection,
            min_size=size,
            max_size=size,
            timeout=timeout_seconds,
            kwargs={
                # The order transaction holds its products' row locks between its two
                # round trips; if this process froze there (a paused VM, a stopped
                # process), PostgreSQL ends it after as long as a statement may take.
                **connect_options(
                    connect_timeout_seconds,
                    statement_timeout_ms,
                    idle_in_transaction_timeout_ms=statement_timeout_ms,
                ),
                "autocommit": True,
            },
            open=False,
            name="marketplace-hot-path",
            # A connection lost in an outage is re-made in the background with exponential
            # backoff; giving up after this long keeps the wait after recovery short (the
            # next caller starts a fresh attempt at once).
            reconnect_timeout=timeout_seconds,
        )
        self._closed = False  # by us: psycopg_pool's own flag is also set before opening
        self._checking: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Starts connecting in the background; the first caller waits for a connection."""
        if self._closed:
            raise PoolTimeoutError("the hot-path pool is closed (the server is stopping)")
        if self._pool.closed:
            await self._pool.open(wait=False)  # idempotent under the pool's own lock

    async def close(self) -> None:
        self._closed = True
        if self._checking is not None:
            # Checking talks to the database with no deadline: never wait on it to stop.
            self._checking.cancel()
            await asyncio.gather(self._checking, return_exceptions=True)
        await self._pool.close()  # nothing to do if it never opened

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[HotConnection]:
        """A connection in autocommit mode (a transaction sends its own BEGIN and COMMIT),
        with psycopg's errors re-raised as SQLAlchemy's."""
        try:
            await self.open()
            async with self._pool.connection() as driver:
                with sqlalchemy_errors(driver):
                    yield driver
        except PoolTimeout as error:
            raise PoolTimeoutError(str(error)) from error
        except psycopg.Error as error:  # from the pool itself (closed, too many waiting)
            raise DBAPIError.instance(
                None, None, error, psycopg.Error, connection_invalidated=True
            ) from error
        except DBAPIError as error:
            if error.connection_invalidated:
                self._check_idle_connections()
            raise

    async def check_connections(self) -> None:
        """Tests every idle connection now, discarding the lost ones: after an outage, before
        calls are let in again (nothing used the pool meanwhile to find them lost)."""
        if not self._closed and not self._pool.closed:
            await self._pool.check()

    def _check_idle_connections(self) -> None:
        """One lost connection means the others idle in the pool are probably lost too (the
        database restarted): test them all now, in the background, so no later caller is
        handed a dead one (SQLAlchemy's pool does the same on a disconnect)."""
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(self._pool.check(), name="hot-path-check")
