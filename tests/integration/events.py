"""Helpers for the event tests: outbox rows written by hand, a relay run in the test's own
loop, and reading back what a JetStream stream holds."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import psycopg
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from server.db.engine import libpq_url
from server.events.nats import MARKETPLACE_STREAM, NatsConnection
from server.events.relay import OutboxMetrics, Relay, RelaySettings
from tests.conftest import eventually


@dataclass(frozen=True)
class Event:
    event_id: str
    aggregate_id: str
    sequence: int


async def write_events(
    database_url: str, aggregates: Sequence[str], per_aggregate: int, *, first_sequence: int = 1
) -> list[Event]:
    """`per_aggregate` events for each aggregate (order aggregates), interleaved, each
    transaction one event, committed in sequence order per aggregate."""
    events = [
        Event(str(uuid.uuid4()), aggregate, sequence)
        for sequence in range(first_sequence, first_sequence + per_aggregate)
        for aggregate in aggregates
    ]
    async with await psycopg.AsyncConnection.connect(libpq_url(database_url)) as conn:
        for event in events:
            await conn.execute(
                """
                INSERT INTO outbox (event_id, aggregate_type, aggregate_id, sequence, subject,
                                    type_name, payload)
                VALUES (%s, 'order', %s, %s, 'marketplace.order.created',
                        'marketplace.events.v1.OrderCreated', %s)
                """,
                (event.event_id, event.aggregate_id, event.sequence, event.event_id.encode()),
            )
            await conn.commit()
    return events


async def outbox_counts(database_url: str) -> tuple[int, int]:
    """(unpublished, published) rows."""
    async with await psycopg.AsyncConnection.connect(libpq_url(database_url)) as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FILTER (WHERE publish_time IS NULL),"
                " count(*) FILTER (WHERE publish_time IS NOT NULL) FROM outbox"
            )
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def relay_settings(**overrides: Any) -> RelaySettings:
    values: dict[str, Any] = {
        "batch_size": 50,
        "idle_poll_seconds": 0.1,
        "leader_retry_seconds": 0.2,
        "publish_timeout_seconds": 2.0,
    }
    return RelaySettings(**(values | overrides))


def relay_for(database_url: str, nats_connection: NatsConnection, **overrides: Any) -> Relay:
    return Relay(
        functools.partial(
            psycopg.AsyncConnection.connect, libpq_url(database_url), autocommit=True
        ),
        nats_connection,
        OutboxMetrics.create(CollectorRegistry()),
        relay_settings(**overrides),
    )


@contextlib.asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[Client]:
    client = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield client
    finally:
        await client.close()


@dataclass(frozen=True)
class StoredMessage:
    sequence: int
    subject: str
    headers: dict[str, str]
    data: bytes


async def stream_messages(url: str, stream: str = MARKETPLACE_STREAM) -> list[StoredMessage]:
    """Every message `stream` holds, in stream order."""
    messages: list[StoredMessage] = []
    async with nats_client(url) as client:
        jetstream = client.jetstream()
        sequence = 0
        while True:
            try:
                raw = await jetstream.get_msg(stream, seq=sequence + 1, next=True, subject=">")
            except NotFoundError:
                return messages
            assert raw.seq is not None
            sequence = raw.seq
            messages.append(
                StoredMessage(
                    raw.seq,
                    raw.subject or "",
                    {str(k): str(v) for k, v in (raw.headers or {}).items()},
                    raw.data or b"",
                )
            )


async def all_published(database_url: str, count: int, within: float = 30) -> None:
    async def published() -> bool:
        unpublished, done = await outbox_counts(database_url)
        return unpublished == 0 and done == count

    await eventually(published, within=within, what=f"{count} outbox rows published")
