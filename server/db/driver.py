"""psycopg itself, under a SQLAlchemy connection, for the few hot statements.

SQLAlchemy Core costs tens of microseconds of Python per statement (compiling the bind
parameters, building a result object, running event hooks) and cannot pipeline. The order
transaction and product lookups run on the psycopg connection that SQLAlchemy's pool
checked out instead: same pool, same transaction (SQLAlchemy still commits or rolls back),
psycopg's pipeline mode to send several statements in one round trip. Everything else stays
on SQLAlchemy. Errors come out as SQLAlchemy's exceptions, so retries and status mapping
see one kind of error whichever layer raised it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

_NAMED_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


def psycopg_sql(statement: str) -> str:
    """SQLAlchemy-style `:name` parameters as psycopg's `%(name)s` (statements here use
    CAST(... AS ...), never `::`, so a colon before a word is always a parameter)."""
    if "%" in statement:
        raise ValueError("a literal % would need escaping for psycopg")
    return _NAMED_PARAMETER.sub(r"%(\1)s", statement)


@contextlib.asynccontextmanager
async def driver_connection(
    conn: AsyncConnection,
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """The psycopg connection under `conn`, inside `conn`'s transaction. A psycopg error is
    re-raised as the SQLAlchemy exception SQLAlchemy would have raised, and a connection
    that broke is invalidated so the pool replaces it instead of handing it out again."""
    fairy = await conn.get_raw_connection()
    driver: psycopg.AsyncConnection[Any] = fairy.driver_connection  # type: ignore[assignment]
    try:
        yield driver
    except psycopg.Error as error:
        broken = driver.closed or driver.broken
        if broken:
            await conn.invalidate(error)
        raise DBAPIError.instance(
            None, None, error, psycopg.Error, connection_invalidated=broken
        ) from error
