"""The consumer framework against a real PostgreSQL and a real nats-server
(server/events/consumers.py, server/events/dead_letters.py): retries, dead letters while
later messages go on, replay through the inbox, and each message applied once however often
it is delivered; and the whole path, outbox to consumer, through a NATS killed mid-load."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.domain.errors import (
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RequestIdReused,
)
from server.domain.identity import Principal, Role
from server.domain.pagination import encode_page_token
from server.events.consumers import (
    ConsumerMetrics,
    Consumers,
    ConsumerSettings,
    ConsumerSpec,
    Delivery,
    Inbox,
    Unprocessable,
)
from server.events.dead_letters import DeadLetters
from server.events.nats import MARKETPLACE_STREAM, NatsConnection
from tests.conftest import eventually, sqlalchemy_engine
from tests.integration.events import (
    all_published,
    nats_client,
    relay_for,
    stream_messages,
    write_events,
)
from tests.stack import NatsServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ADMIN = Principal("root", frozenset({Role.ADMIN}))
SUBJECT = "marketplace.order.created"


@pytest.fixture
async def engine(events_database: str) -> AsyncIterator[AsyncEngine]:
    engine = sqlalchemy_engine(events_database, pool_size=5)
    async with engine.begin() as conn:
        # The consumer's effect: one row per application, so a second one would show.
        await conn.execute(text("CREATE TABLE test_effects (message_id text, data bytea)"))
    yield engine
    await engine.dispose()


@pytest.fixture
async def nats_connection(nats_server: NatsServer) -> AsyncIterator[NatsConnection]:
    connection = NatsConnection(nats_server.url, reconnect_wait_seconds=0.2)
    task = asyncio.create_task(connection.run())
    await connection.ready()
    yield connection
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@dataclass
class RecordingConsumer:
    """Applies a message by writing a test_effects row through the inbox; fails on the
    messages in `failing` (a RuntimeError) or `unprocessable` until told otherwise."""

    inbox: Inbox
    name: str = "recorder"
    failing: set[bytes] = field(default_factory=set)
    unprocessable: set[bytes] = field(default_factory=set)
    # (data, attempt) of every call, in order
    calls: list[tuple[bytes, int]] = field(default_factory=list)

    def spec(self, subjects: tuple[str, ...] = ("marketplace.order.>",)) -> ConsumerSpec:
        return ConsumerSpec(self.name, MARKETPLACE_STREAM, subjects, self.handle)

    async def handle(self, delivery: Delivery) -> None:
        self.calls.append((delivery.data, delivery.attempt))
        if delivery.data in self.unprocessable:
            raise Unprocessable(f"cannot apply {delivery.data!r}")
        if delivery.data in self.failing:
            raise RuntimeError("boom")
        async with self.inbox.once(self.name, delivery.message_id) as conn:
            if conn is None:
                return
            await conn.execute(
                text("INSERT INTO test_effects VALUES (:id, :data)"),
                {"id": delivery.message_id, "data": delivery.data},
            )


def consumers_for(
    nats_connection: NatsConnection, *specs: ConsumerSpec, max_deliver: int = 3
) -> Consumers:
    return Consumers(
        nats_connection,
        list(specs),
        ConsumerSettings(max_deliver=max_deliver, ack_wait_seconds=5, retry_delay_seconds=0.2),
        ConsumerMetrics.create(CollectorRegistry()),
    )


@contextlib.asynccontextmanager
async def running(consumers: Consumers) -> AsyncIterator[None]:
    task = asyncio.create_task(consumers.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish(url: str, *payloads: bytes) -> list[str]:
    """Each payload as an event with an id of its own; the ids."""
    ids = []
    async with nats_client(url) as client:
        jetstream = client.jetstream()
        for payload in payloads:
            event_id = str(uuid.uuid4())
            headers = {"Nats-Msg-Id": event_id}
            await jetstream.publish(SUBJECT, payload, headers=headers)
            ids.append(event_id)
    return ids


async def effects(engine: AsyncEngine) -> list[tuple[str, bytes]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT message_id, data FROM test_effects"))
        return [(row.message_id, bytes(row.data)) for row in rows]


async def test_a_poison_message_is_dead_lettered_while_later_ones_go_on_and_replayed_once(
    engine: AsyncEngine, nats_server: NatsServer, nats_connection: NatsConnection
) -> None:
    consumer = RecordingConsumer(Inbox(engine), failing={b"poison"})
    later = [f"later-{n}".encode() for n in range(5)]
    ids = await publish(nats_server.url, b"first", b"poison", *later)
    dead_letters = DeadLetters(nats_connection, engine, [consumer.spec()])
    async with running(consumers_for(nats_connection, consumer.spec(), max_deliver=3)):

        async def one_dead_letter() -> bool:
            letters, _ = await dead_letters.list_dead_letters(10, "")
            return len(letters) == 1

        await eventually(one_dead_letter, within=30, what="the poison message dead-lettered")
        applied = await effects(engine)
        assert sorted(data for _, data in applied) == sorted([b"first", *later])
        poison_calls = [n for n, (data, _) in enumerate(consumer.calls) if data == b"poison"]
        assert [consumer.calls[n][1] for n in poison_calls] == [1, 2, 3], "max_deliver attempts"
        last_later = max(n for n, (data, _) in enumerate(consumer.calls) if data in later)
        assert last_later < poison_calls[1], "later messages went on while it was retried"

        [letter], next_token = await dead_letters.list_dead_letters(10, "")
        assert next_token == ""
        assert (letter.consumer, letter.error, letter.attempts) == (
            "recorder",
            "RuntimeError: boom",
            3,
        )
        assert (letter.original_stream, letter.original_subject) == (MARKETPLACE_STREAM, SUBJECT)
        assert letter.message_id == ids[1]
        assert letter.data == b"poison"
        assert letter.subject == "marketplace.dlq.recorder"

        with pytest.raises(FailedPrecondition) as still_failing:
            await dead_letters.replay_dead_letter(ADMIN, letter.id, "replay-1")
        assert still_failing.value.reason == ErrorReason.DEAD_LETTER_STILL_FAILS
        assert "boom" in still_failing.value.message
        assert len((await dead_letters.list_dead_letters(10, ""))[0]) == 1, "it stays"

        consumer.failing.clear()  # the fix
        replayed = await dead_letters.replay_dead_letter(ADMIN, letter.id, "replay-2")
        assert replayed.id == letter.id
        assert (await dead_letters.list_dead_letters(10, ""))[0] == [], "gone once applied"
        # A retry of the same request answers the same; another request finds nothing.
        again = await dead_letters.replay_dead_letter(ADMIN, letter.id, "replay-2")
        assert (again.id, again.message_id, again.data) == (letter.id, ids[1], b"poison")
        with pytest.raises(NotFound):
            await dead_letters.replay_dead_letter(ADMIN, letter.id, "replay-3")
        with pytest.raises(RequestIdReused):
            await dead_letters.replay_dead_letter(ADMIN, letter.id + 1, "replay-2")
    assert sorted(await effects(engine)) == sorted(
        [(ids[0], b"first"), (ids[1], b"poison"), *zip(ids[2:], later, strict=True)]
    ), "every message applied exactly once"


async def test_a_replay_of_a_message_applied_meanwhile_applies_nothing(
    engine: AsyncEngine, nats_server: NatsServer, nats_connection: NatsConnection
) -> None:
    """The inbox keys a replay on the original delivery's id: had the effect been applied
    (the consumer died after committing, before acking), the replay is a no-op."""
    consumer = RecordingConsumer(Inbox(engine), unprocessable={b"odd"})
    [event_id] = await publish(nats_server.url, b"odd")
    dead_letters = DeadLetters(nats_connection, engine, [consumer.spec()])
    async with running(consumers_for(nats_connection, consumer.spec())):

        async def dead_lettered() -> bool:
            return bool((await dead_letters.list_dead_letters(10, ""))[0])

        await eventually(dead_lettered, within=30, what="the unprocessable message")
    assert consumer.calls == [(b"odd", 1)], "dead-lettered at the first attempt"
    [letter], _ = await dead_letters.list_dead_letters(10, "", "recorder")
    assert letter.error == "cannot apply b'odd'"
    assert letter.attempts == 1
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO inbox (consumer, message_id) VALUES ('recorder', :id)"),
            {"id": event_id},
        )
    consumer.unprocessable.clear()
    await dead_letters.replay_dead_letter(ADMIN, letter.id, "replay")
    assert await effects(engine) == []
    assert (await dead_letters.list_dead_letters(10, ""))[0] == []


async def test_dead_letters_are_listed_in_pages_per_consumer(
    engine: AsyncEngine, nats_server: NatsServer, nats_connection: NatsConnection
) -> None:
    first = RecordingConsumer(Inbox(engine), name="first", unprocessable={b"a", b"b", b"c"})
    second = RecordingConsumer(Inbox(engine), name="second", unprocessable={b"a", b"b", b"c"})
    await publish(nats_server.url, b"a", b"b", b"c")
    dead_letters = DeadLetters(nats_connection, engine, [first.spec(), second.spec()])
    async with running(consumers_for(nats_connection, first.spec(), second.spec())):

        async def all_six() -> bool:
            return len((await dead_letters.list_dead_letters(100, ""))[0]) == 6

        await eventually(all_six, within=30, what="six dead letters")
    page, token = await dead_letters.list_dead_letters(2, "", "second")
    assert [letter.data for letter in page] == [b"a", b"b"]
    rest, last = await dead_letters.list_dead_letters(2, token, "second")
    assert ([letter.data for letter in rest], last) == ([b"c"], "")
    assert {letter.consumer for letter in page + rest} == {"second"}
    with pytest.raises(Exception, match="page_token"):
        await dead_letters.list_dead_letters(2, token, "first")
    # Tokens are base64 JSON, not signed: a made-up position is a bad token, not a NATS
    # error answered UNAVAILABLE.
    for after in (2**64 - 1, -1, True, "1"):
        forged = encode_page_token("deadLetters", "second", {"after": after})
        with pytest.raises(InvalidArgument, match="page_token"):
            await dead_letters.list_dead_letters(2, forged, "second")


async def test_every_committed_event_is_applied_once_through_a_nats_killed_mid_load(
    events_database: str, engine: AsyncEngine, nats_server: NatsServer
) -> None:
    """Writers commit outbox rows while the relay publishes and a consumer applies them;
    NATS is SIGKILLed in the middle and started again on its store. Every event reaches the
    stream once and is applied once."""
    consumer = RecordingConsumer(Inbox(engine))
    aggregates = [str(uuid.uuid4()) for _ in range(8)]
    nats_connection = NatsConnection(nats_server.url, reconnect_wait_seconds=0.2)
    connection_task = asyncio.create_task(nats_connection.run())
    relay = relay_for(events_database, nats_connection, batch_size=20)
    relay_task = asyncio.create_task(relay.run())
    try:
        async with running(consumers_for(nats_connection, consumer.spec(), max_deliver=100)):
            writers = [
                asyncio.create_task(write_events(events_database, [aggregate], 40))
                for aggregate in aggregates
            ]
            await eventually(
                lambda: _applied_at_least(engine, 20), within=30, what="the first events"
            )
            nats_server.kill()
            await asyncio.sleep(1.0)
            nats_server.start()
            events = [event for batch in await asyncio.gather(*writers) for event in batch]
            await all_published(events_database, len(events), within=60)
            await eventually(
                lambda: _applied_at_least(engine, len(events)), within=60, what="all applied"
            )
            await asyncio.sleep(0.5)  # a duplicate application would have shown by now
    finally:
        relay_task.cancel()
        connection_task.cancel()
        await asyncio.gather(relay_task, connection_task, return_exceptions=True)
    applied = [message_id for message_id, _ in await effects(engine)]
    assert sorted(applied) == sorted(event.event_id for event in events)
    on_stream = [m.headers["Nats-Msg-Id"] for m in await stream_messages(nats_server.url)]
    assert sorted(on_stream) == sorted(applied), "each event once on the stream"


async def _applied_at_least(engine: AsyncEngine, count: int) -> bool:
    return len(await effects(engine)) >= count


async def test_a_consumer_outlives_a_failure_of_its_own_and_the_others_go_on(
    engine: AsyncEngine, nats_server: NatsServer, nats_connection: NatsConnection
) -> None:
    """A bug in the runner itself (here: its first message for `fragile` raises) is logged
    and retried; neither that consumer nor the other one stops for good."""
    fragile = RecordingConsumer(Inbox(engine), name="fragile")
    steady = RecordingConsumer(Inbox(engine), name="steady")

    class FailingOnce(Consumers):
        failed = False

        async def _process(self, spec: ConsumerSpec, jetstream: Any, msg: Any) -> None:
            if spec.name == "fragile" and not FailingOnce.failed:
                FailingOnce.failed = True
                raise ValueError("a bug")
            await super()._process(spec, jetstream, msg)

    consumers = FailingOnce(
        nats_connection,
        [fragile.spec(), steady.spec()],
        ConsumerSettings(ack_wait_seconds=1, retry_delay_seconds=0.1),
        ConsumerMetrics.create(CollectorRegistry()),
    )
    await publish(nats_server.url, b"one", b"two")
    async with running(consumers):
        await eventually(
            lambda: _applied_at_least(engine, 4), within=30, what="both consumers' effects"
        )
    assert FailingOnce.failed
    assert sorted(data for _, data in await effects(engine)) == [b"one", b"one", b"two", b"two"]


async def test_a_slow_handler_does_not_let_the_rest_of_its_batch_be_delivered_again(
    engine: AsyncEngine, nats_server: NatsServer, nats_connection: NatsConnection
) -> None:
    """One fetch takes several messages; handled one by one, slowly (a blackholed SMTP
    server), the last ones would outlive the ack wait before their turn and come again,
    an attempt counted against them though nothing failed."""

    class Slow(RecordingConsumer):
        async def handle(self, delivery: Delivery) -> None:
            await asyncio.sleep(0.4)
            await super().handle(delivery)

    consumer = Slow(Inbox(engine))
    payloads = [f"slow-{n}".encode() for n in range(6)]
    await publish(nats_server.url, *payloads)
    consumers = Consumers(
        nats_connection,
        [consumer.spec()],
        ConsumerSettings(ack_wait_seconds=1, retry_delay_seconds=0.1),
        ConsumerMetrics.create(CollectorRegistry()),
    )
    async with running(consumers):
        await eventually(lambda: _applied_at_least(engine, 6), within=30, what="6 effects")
        await asyncio.sleep(1.5)  # an ack wait and a half: a redelivery would have come

    assert [attempt for _, attempt in consumer.calls] == [1] * 6, consumer.calls
