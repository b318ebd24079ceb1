"""Durable JetStream pull consumers: the types handlers are written against, the inbox that
makes a handler's effect happen once, and the runner that fetches, acks and dead-letters.

A handler is `async def handle(delivery: Delivery) -> None`:

- it returns: the message is acked;
- it raises `Unprocessable(reason)`: a permanent problem with the message itself (malformed,
  unknown SKU or order); the message is dead-lettered at once;
- it raises anything else: the message is redelivered with backoff, and dead-lettered when
  its delivery attempt reaches CONSUMER_MAX_DELIVER.

Meanwhile the consumer carries on with later messages. JetStream delivers at least once, so
a handler makes its effect idempotent with the inbox, whose row commits with the effect:

    async def handle(delivery: Delivery) -> None:
        async with inbox.once("warehouse-levels", delivery.message_id) as conn:
            if conn is None:
                return  # applied before: a redelivery, or a replay of a dead letter
            await conn.execute(...)  # the effect, in the inbox row's transaction
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

# The event id B1's relay puts on every MARKETPLACE message; a replay keeps it even when it
# must be published under a fresh Nats-Msg-Id.
EVENT_ID_HEADER = "Marketplace-Event-Id"
EVENT_TYPE_HEADER = "Marketplace-Event-Type"
MSG_ID_HEADER = "Nats-Msg-Id"


@dataclass(frozen=True)
class Delivery:
    """One delivery of a message to a consumer's handler."""

    subject: str
    headers: Mapping[str, str]
    data: bytes
    # 1 on the first delivery; the message is dead-lettered after the attempt that reaches
    # CONSUMER_MAX_DELIVER fails. A replay of a dead letter runs with the attempt it died on + 1.
    attempt: int
    # What the inbox keys on: the Marketplace-Event-Id header, else Nats-Msg-Id, else
    # "<stream>:<stream sequence>" (stable across redeliveries of one stored message).
    message_id: str


class Unprocessable(Exception):
    """Raised by a handler for a message that can never be applied (malformed, unknown SKU
    or order): it is dead-lettered at once, with `reason` as its error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable consumer: `name` is the JetStream durable name (also the inbox's consumer
    and the dead-letter subject's last token, so letters, digits, `-` and `_` only), reading
    `stream` ("MARKETPLACE" or "WAREHOUSE") filtered to `filter_subjects`."""

    name: str
    stream: str
    filter_subjects: tuple[str, ...]
    handle: Handler = field(compare=False)


_CLAIM = text(
    """
    INSERT INTO inbox (consumer, message_id) VALUES (:consumer, :message_id)
    ON CONFLICT DO NOTHING
    RETURNING 1
    """
)


class Inbox:
    """Which messages each consumer has applied (table `inbox`, migration 0007)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @contextlib.asynccontextmanager
    async def once(self, consumer: str, message_id: str) -> AsyncIterator[AsyncConnection | None]:
        """A connection in a transaction that records `message_id` as applied by `consumer`,
        committed with whatever the block writes on it (rolled back with it when the block
        raises); None when it was applied before. A concurrent delivery of the same message
        waits on the first one's uncommitted row and then gets None."""
        async with self._engine.begin() as conn:
            claimed = await conn.execute(_CLAIM, {"consumer": consumer, "message_id": message_id})
            if claimed.first() is None:
                yield None
            else:
                yield conn
