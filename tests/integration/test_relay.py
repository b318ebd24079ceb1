"""The outbox relay against a real PostgreSQL and a real nats-server (server/events/relay.py):
each row published once, in order per aggregate, with its headers; harmless crashes between
publishing and marking; one leader among several relays; NATS down and back; pruning and
the backlog metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence

import psycopg
import pytest
from opentelemetry.trace import Span

from server.db.engine import libpq_url
from server.events.nats import (
    DEAD_LETTER_STREAM,
    MARKETPLACE_STREAM,
    WAREHOUSE_STREAM,
    NatsConnection,
    ensure_streams,
)
from server.events.relay import AckedPublisher, OutboxRow, Relay, StoreRefused
from tests.conftest import eventually
from tests.integration.events import (
    Event,
    StoredMessage,
    all_published,
    nats_client,
    outbox_counts,
    relay_for,
    stream_messages,
    write_events,
)
from tests.stack import NatsServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MARKETPLACE_SUBJECTS = [
    "marketplace.order.>",
    "marketplace.payment.>",
    "marketplace.inventory.>",
    "marketplace.fulfilment.>",
]


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[NatsConnection]:
    connection = NatsConnection(url, reconnect_wait_seconds=0.2)
    task = asyncio.create_task(connection.run())
    try:
        yield connection
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def running(*relays: Relay) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(relay.run()) for relay in relays]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def assert_once_in_order(messages: Sequence[StoredMessage], events: Sequence[Event]) -> None:
    """Every event exactly once on the stream, each aggregate's in sequence order."""
    by_id = {event.event_id: event for event in events}
    ids = [message.headers["Nats-Msg-Id"] for message in messages]
    assert sorted(ids) == sorted(by_id), "each event once on the stream"
    sequences: dict[str, list[int]] = defaultdict(list)
    for event_id in ids:
        sequences[by_id[event_id].aggregate_id].append(by_id[event_id].sequence)
    for aggregate, seen in sequences.items():
        assert seen == sorted(seen), f"aggregate {aggregate} out of order: {seen}"


async def test_each_row_is_published_once_in_order_with_its_headers(
    events_database: str, nats_server: NatsServer
) -> None:
    aggregates = [str(uuid.uuid4()) for _ in range(5)]
    events = await write_events(events_database, aggregates, 40)
    async with connected(nats_server.url) as nats_connection:
        relay = relay_for(events_database, nats_connection, batch_size=37)
        async with running(relay):
            await all_published(events_database, len(events))
            assert relay._metrics.published._value.get() == len(events)
    messages = await stream_messages(nats_server.url)
    assert_once_in_order(messages, events)
    first = messages[0]
    assert first.subject == "marketplace.order.created"
    assert first.headers == {
        "Nats-Msg-Id": first.data.decode(),  # the event's id
        "Marketplace-Event-Type": "marketplace.events.v1.OrderCreated",
    }


async def test_a_relay_killed_between_publish_and_mark_publishes_nothing_twice(
    events_database: str, nats_server: NatsServer
) -> None:
    """A relay process is SIGKILLed after JetStream stored its first batch and before it
    marked the rows; the next relay publishes them again, and JetStream drops the
    duplicates by their Nats-Msg-Id."""
    aggregates = [str(uuid.uuid4()) for _ in range(3)]
    events = await write_events(events_database, aggregates, 30)
    crashing = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.relay_crash",
        events_database,
        nats_server.url,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(crashing.communicate(), timeout=60)
    assert crashing.returncode == -9, stderr.decode()[-2000:]
    assert await outbox_counts(events_database) == (len(events), 0), "nothing was marked"
    crashed_batch = await stream_messages(nats_server.url)
    assert len(crashed_batch) == 50, "the killed relay's batch was stored"
    async with (
        connected(nats_server.url) as nats_connection,
        running(relay_for(events_database, nats_connection)),
    ):
        await all_published(events_database, len(events))
    assert_once_in_order(await stream_messages(nats_server.url), events)


async def test_two_relays_at_once_publish_each_event_once_and_take_over(
    events_database: str, nats_server: NatsServer
) -> None:
    """Two relays run together while events are written; the leader's connection is then
    killed hard (its task cancelled mid-batch, its session closed without marking) and the
    other one takes over."""
    aggregates = [str(uuid.uuid4()) for _ in range(4)]
    async with (
        connected(nats_server.url) as first_nats,
        connected(nats_server.url) as second_nats,
    ):
        first = relay_for(events_database, first_nats, batch_size=10)
        second = relay_for(events_database, second_nats, batch_size=10)
        async with running(first) as first_tasks, running(second):
            events = await write_events(events_database, aggregates, 25)
            await eventually(
                lambda: _some_published(events_database), within=30, what="the first rows out"
            )
            first_tasks[0].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first_tasks[0]
            events += await write_events(events_database, aggregates, 25, first_sequence=26)
            await all_published(events_database, len(events))
    assert_once_in_order(await stream_messages(nats_server.url), events)


async def _some_published(database_url: str) -> bool:
    _, published = await outbox_counts(database_url)
    return published > 0


async def test_events_wait_while_nats_is_down_and_go_out_once_when_it_is_back(
    events_database: str, nats_server: NatsServer
) -> None:
    aggregates = [str(uuid.uuid4()) for _ in range(3)]
    async with connected(nats_server.url) as nats_connection:
        relay = relay_for(events_database, nats_connection, batch_size=20)
        async with running(relay):
            events = await write_events(events_database, aggregates, 10)
            await all_published(events_database, len(events))
            nats_server.kill()
            more = await write_events(events_database, aggregates, 10, first_sequence=11)

            async def backlog_seen() -> bool:
                depth = relay._metrics.depth._value.get()
                lag = relay._metrics.lag_seconds._value.get()
                return depth == len(more) and lag > 0.5

            await eventually(backlog_seen, within=10, what="depth and lag of the waiting events")
            assert await outbox_counts(events_database) == (len(more), len(events))
            nats_server.start()
            await all_published(events_database, len(events) + len(more))

            async def caught_up() -> bool:
                return relay._metrics.depth._value.get() == 0

            await eventually(caught_up, within=10, what="depth back to 0")
            assert relay._metrics.lag_seconds._value.get() == 0
    assert_once_in_order(await stream_messages(nats_server.url), events + more)


async def test_published_rows_are_pruned_after_the_retention(
    events_database: str, nats_server: NatsServer
) -> None:
    aggregates = [str(uuid.uuid4()) for _ in range(2)]
    events = await write_events(events_database, aggregates, 1500)
    async with await psycopg.AsyncConnection.connect(
        libpq_url(events_database), autocommit=True
    ) as conn:
        # Two thirds published long ago, a sixth recently, a sixth not at all.
        await conn.execute(
            "UPDATE outbox SET publish_time = now() - interval '8 days' WHERE position <= 2000"
        )
        await conn.execute(
            "UPDATE outbox SET publish_time = now() - interval '1 day'"
            " WHERE position > 2000 AND position <= 2500"
        )
        async with connected(nats_server.url) as nats_connection:
            relay = relay_for(events_database, nats_connection)
            assert await relay.prune(conn) == 2000
            assert await relay.prune(conn) == 0
        remaining = await (await conn.execute("SELECT count(*) FROM outbox")).fetchone()
    assert remaining == (len(events) - 2000,)
    assert await outbox_counts(events_database) == (500, 500)


async def test_streams_are_made_once_and_an_operators_limits_stay(nats_server: NatsServer) -> None:
    async with nats_client(nats_server.url) as client:
        jetstream = client.jetstream()
        await asyncio.gather(*(ensure_streams(jetstream) for _ in range(4)))
        marketplace = (await jetstream.stream_info(MARKETPLACE_STREAM)).config
        assert sorted(marketplace.subjects or []) == sorted(MARKETPLACE_SUBJECTS)
        assert marketplace.duplicate_window == 120
        assert (await jetstream.stream_info(DEAD_LETTER_STREAM)).config.subjects == [
            "marketplace.dlq.>"
        ]
        assert (await jetstream.stream_info(WAREHOUSE_STREAM)).config.subjects == ["warehouse.>"]
        # An operator bounds the stream's age; someone narrowed its subjects by mistake.
        marketplace.max_age = 3600
        marketplace.subjects = ["marketplace.order.>"]
        await jetstream.update_stream(marketplace)
        await ensure_streams(jetstream)
        after = (await jetstream.stream_info(MARKETPLACE_STREAM)).config
    assert after.max_age == 3600
    assert sorted(after.subjects or []) == sorted(MARKETPLACE_SUBJECTS)


class _ExpectingAnotherLastSequence(OutboxRow):
    """A row JetStream must refuse: it expects the stream to end at a sequence it does not."""

    def headers(self, span: Span | None = None) -> dict[str, str]:
        return super().headers(span) | {"Nats-Expected-Last-Sequence": "999"}


def _row(kind: type[OutboxRow], position: int, event_id: str) -> OutboxRow:
    return kind(
        position=position,
        event_id=event_id,
        aggregate=("order", "o-1"),
        subject="marketplace.order.created",
        type_name="marketplace.events.v1.OrderCreated",
        payload=b"\x0a\x03o-1",
    )


async def test_acknowledgements_give_the_stored_sequence_a_repeat_s_and_a_refusal(
    nats_server: NatsServer,
) -> None:
    """What AckedPublisher reads from JetStream's answers: the sequence a message was stored
    at, the first one's again for a repeated Nats-Msg-Id, and an error as a refusal."""
    async with nats_client(nats_server.url) as client:
        await ensure_streams(client.jetstream())
        publisher = AckedPublisher()
        repeated_id = str(uuid.uuid4())
        sent = await publisher.send(
            client,
            [
                _row(OutboxRow, 1, repeated_id),
                _row(OutboxRow, 2, str(uuid.uuid4())),
                _row(OutboxRow, 3, repeated_id),
                _row(_ExpectingAnotherLastSequence, 4, str(uuid.uuid4())),
            ],
        )
        first, second, repeat, refused = await publisher.acknowledgements(sent, 10)
        assert (first, second, repeat) == (1, 2, 1)
        assert isinstance(refused, StoreRefused)
        assert "wrong last sequence" in str(refused)


async def test_a_message_left_unanswered_is_a_timeout_and_no_longer_waited_for(
    nats_server: NatsServer,
) -> None:
    """A message whose subject no stream stores, and whose only subscriber never answers,
    gets no PubAck: after the wait its answer is a timeout, the stored one's is its
    sequence, and the publisher keeps no token of either."""
    async with nats_client(nats_server.url) as client:
        await ensure_streams(client.jetstream())
        await client.subscribe("nowhere.>")  # interest, so NATS sends no "no responders"
        publisher = AckedPublisher()
        unstored = dataclasses.replace(
            _row(OutboxRow, 2, str(uuid.uuid4())), subject="nowhere.order.created"
        )
        sent = await publisher.send(client, [_row(OutboxRow, 1, str(uuid.uuid4())), unstored])
        stored, unanswered = await publisher.acknowledgements(sent, 1.0)
        assert stored == 1
        assert isinstance(unanswered, TimeoutError)
        assert publisher._waiting == {}
