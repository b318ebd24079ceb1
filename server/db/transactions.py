"""Retrying a transaction that lost a race: serialization failures and deadlocks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

# serialization_failure, deadlock_detected: PostgreSQL rolled the transaction back and
# asks the client to run it again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
MAX_ATTEMPTS = 5
UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"


def sqlstate(error: BaseException) -> str | None:
    if isinstance(error, DBAPIError):
        state = getattr(error.orig, "sqlstate", None)
        return state if isinstance(state, str) else None
    return None


def is_retryable_conflict(error: BaseException) -> bool:
    return sqlstate(error) in RETRYABLE_SQLSTATES


def retrying_transaction(extra: type[Exception] | None = None) -> AsyncRetrying:
    """Wraps one unit of work: `async for attempt in retrying_transaction(): with attempt:`.

    `extra` names one more exception type that means "lost a race, run again".
    The attempts are bounded so a pathological conflict surfaces as ABORTED (retryable
    by the client) rather than spinning forever.
    """
    return AsyncRetrying(
        stop=stop_after_attempt(MAX_ATTEMPTS),
        wait=wait_random_exponential(multiplier=0.005, max=0.2),
        retry=retry_if_exception(
            lambda error: (
                is_retryable_conflict(error) or (extra is not None and isinstance(error, extra))
            )
        ),
        reraise=True,
    )


Result = TypeVar("Result")


async def in_transaction(
    engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[Result]]
) -> Result:
    """Runs `work(conn)` in one transaction, committed when it returns, and runs it again
    from the start when PostgreSQL rolled it back for losing a race."""
    async for attempt in retrying_transaction():
        with attempt:
            async with engine.begin() as conn:
                return await work(conn)
    raise AssertionError("unreachable: retrying_transaction re-raises")
