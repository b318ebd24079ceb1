"""Catalog reads on a PostgreSQL streaming replica (DATABASE_REPLICA_URL), with the primary
behind it: while the replica fails, and for a moment after this process wrote the catalog,
so that a writer reads its own writes (docs/operations.md#a-read-replica)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import psycopg
import structlog
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")
_log = structlog.get_logger("marketplace.replica")
# A replica that failed is left alone this long before it is tried again.
REPLICA_RETRY_SECONDS = 5.0
# After a catalog write, this process reads from the primary this long: far above the lag
# of a healthy streaming replica on one network.
OWN_WRITES_SECONDS = 2.0


# Read before the rows, in a statement of its own: the rows' snapshot, taken after it, holds
# every commit replayed up to it (read in the same statement it could be newer than them).
_REPLAYED_LSN = text("SELECT CAST(pg_last_wal_replay_lsn() - '0/0' AS bigint)")


class ReadOnReplica(list[T]):
    """Rows a replica answered, with how far it had replayed the primary's WAL (a byte
    position; None if it never was a replica) before reading them: they hold every change
    committed on the primary up to there, and perhaps none after."""

    def __init__(self, rows: Iterable[T], replayed_lsn: int | None) -> None:
        super().__init__(rows)
        self.replayed_lsn = replayed_lsn


def same_origin(read: Sequence[object], items: Iterable[T]) -> list[T]:
    """`items` made from `read`, marked as from the replica when `read` was."""
    if isinstance(read, ReadOnReplica):
        return ReadOnReplica(items, read.replayed_lsn)
    return list(items)


class ReadRoute:
    """Where a single-statement read goes: the replica when there is one and it answers,
    else the primary. `replica` and `primary` are autocommit engines."""

    def __init__(self, primary: AsyncEngine, replica: AsyncEngine | None = None) -> None:
        self._primary = primary
        self._replica = replica
        self._primary_until = 0.0

    def wrote(self) -> None:
        """This process changed the catalog: its next reads see it (on the primary)."""
        self._primary_until = max(self._primary_until, time.monotonic() + OWN_WRITES_SECONDS)

    async def read(
        self,
        query: Callable[[AsyncConnection], Awaitable[Sequence[T]]],
        *,
        on_primary: Callable[[], Awaitable[Sequence[T]]] | None = None,
    ) -> Sequence[T]:
        """`query`'s rows, a ReadOnReplica when the replica answered; on the primary,
        `on_primary` runs instead of `query` when given (the hot path's own pool)."""
        if self._replica is not None and time.monotonic() >= self._primary_until:
            try:
                async with self._replica.connect() as conn:
                    replayed = (await conn.execute(_REPLAYED_LSN)).scalar()
                    return ReadOnReplica(await query(conn), replayed)
            except (OperationalError, InterfaceError, psycopg.OperationalError, OSError) as error:
                # Down, restarting or unreachable: the primary answers instead, at once.
                _log.warning("read replica failed; reading from the primary", error=repr(error))
                self._primary_until = time.monotonic() + REPLICA_RETRY_SECONDS
        if on_primary is not None:
            return await on_primary()
        async with self._primary.connect() as conn:
            return await query(conn)
