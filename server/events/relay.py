"""The outbox relay: publishes the rows of table `outbox` to JetStream, in position order.

Every server process runs one; only the holder of a PostgreSQL advisory lock publishes (the
lock is taken on the relay's own session connection, and ends with it, so a dead leader's
place is taken within OUTBOX_LEADER_RETRY). One publisher reading in position order keeps
each aggregate's events in commit order without any reasoning about claimers: with
`FOR UPDATE SKIP LOCKED`, two relays could publish sequence n and n+1 of one aggregate at
the same time and JetStream store them either way round.

Each event goes out with its event id as Nats-Msg-Id: a relay that dies between publishing
and marking its rows leaves them unpublished, and the next leader's re-publish is dropped
by JetStream as a duplicate (within the stream's two-minute window). Events of one batch are
pipelined, except that an aggregate's next event is only sent once its previous one is
stored, so a failure in the middle of a batch cannot reorder an aggregate.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import CollectorRegistry, Counter, Gauge

from server.events.backoff import Backoff, jittered
from server.events.consumers import EVENT_TYPE_HEADER, MSG_ID_HEADER
from server.events.nats import NatsConnection, raise_if_cancelled
from server.tracing import ORDER_ID, TRACEPARENT, extracted, inject

_log = structlog.get_logger("marketplace.relay")

# Any bigint no other code locks with: the relay's leadership, one per database.
RELAY_LOCK_KEY = 7_015_000_000_000_015
# After a failed publish, the next try waits this long, doubling up to the maximum.
_RETRY_FIRST_SECONDS = 0.1
_RETRY_MAX_SECONDS = 5.0
# A session that ended sooner than this after it began doubles the wait before the next
# one; one that lasted longer starts from the shortest wait again.
_HEALTHY_SESSION_SECONDS = 60.0
# Rows deleted per statement when pruning (short transactions, short locks).
_PRUNE_CHUNK = 1000
_METRICS_EVERY_SECONDS = 1.0

_TRY_LOCK = "SELECT pg_try_advisory_lock(%(key)s)"
# The event id as text and every column in binary: psycopg then builds no UUID and decodes
# no hex for the payload (1.7 against 3.6 us of the relay's CPU per row, docs/benchmarks.md).
_UNPUBLISHED = """
    SELECT position, event_id::text, aggregate_id, aggregate_type, subject, type_name, payload,
           traceparent
      FROM outbox
     WHERE publish_time IS NULL
     ORDER BY position
     LIMIT %(limit)s
"""
_MARK_PUBLISHED = """
    UPDATE outbox SET publish_time = now()
     WHERE position = ANY(%(positions)s) AND publish_time IS NULL
"""
_BACKLOG = """
    SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(create_time)), 0)
      FROM outbox
     WHERE publish_time IS NULL
"""
# The oldest rows by position (the primary key), deleted when published long enough ago:
# rows are published roughly in position order, so pruning stops at the first chunk that
# is not wholly old enough.
_PRUNE_OUTBOX = """
    DELETE FROM outbox
     WHERE position IN (SELECT position FROM outbox ORDER BY position LIMIT %(limit)s)
       AND publish_time < now() - make_interval(secs => %(age)s)
"""
_PRUNE_INBOX = """
    DELETE FROM inbox
     WHERE (consumer, message_id) IN (
           SELECT consumer, message_id FROM inbox
            WHERE process_time < now() - make_interval(secs => %(age)s)
            LIMIT %(limit)s)
"""

Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]
# The stream sequence in a PubAck, `{"stream":"MARKETPLACE","seq":42}` (with
# `"duplicate":true` when JetStream had the message already).
_PUB_ACK_SEQ = re.compile(rb'"seq"\s*:\s*(\d+)')


class StoreRefused(Exception):
    """JetStream answered a publish with an error instead of storing it."""


Ack = int | BaseException


class SentGroup:
    """Messages sent together, and JetStream's answer to each as it arrives: the stream
    sequence the message was stored at (or already had), or why it was not."""

    __slots__ = ("_unanswered", "acks", "answered", "tokens")

    def __init__(self, size: int) -> None:
        self.acks: list[Ack | None] = [None] * size
        self.tokens: list[str] = []
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unanswered = size
        if size == 0:
            self.answered.set_result(None)

    def settle(self, index: int, ack: Ack) -> None:
        if self.acks[index] is not None:
            return
        self.acks[index] = ack
        self._unanswered -= 1
        if self._unanswered == 0 and not self.answered.done():
            self.answered.set_result(None)


class AckedPublisher:
    """Publishes to JetStream and collects each message's acknowledgement, as JetStream's
    publish is defined: a core NATS publish with a reply subject, answered with a PubAck
    (`{"stream", "seq", "duplicate"}`) or `{"error"}`.

    Written on the client's plain `publish` rather than nats-py's `publish_async`, which
    spends about half the relay's CPU per event on its own bookkeeping (a semaphore acquired
    under `wait_for`, two random bytes from the OS per message) that the relay, which
    bounds its own batches, does not need: one reply subscription per client, a counter
    for tokens, and one future per group of messages rather than one per message, which
    an `asyncio.wait` over them would call back one by one (measured in docs/benchmarks.md)."""

    def __init__(self) -> None:
        self._client: Client | None = None
        self._subscription: Subscription | None = None
        self._prefix = ""
        self._tokens = itertools.count()
        self._waiting: dict[str, tuple[SentGroup, int]] = {}

    async def send(
        self,
        client: Client,
        rows: Sequence[OutboxRow],
        spans: Sequence[Span | None] | None = None,
    ) -> SentGroup:
        """Sends `rows` in order (each in its span's trace, when traced); their answers
        arrive in the group. A send that fails part-way stops waiting for the rows sent."""
        if client is not self._client or self._subscription is None:
            await self._listen(client)
        group = SentGroup(len(rows))
        try:
            for index, row in enumerate(rows):
                token = str(next(self._tokens))
                self._waiting[token] = (group, index)
                group.tokens.append(token)
                await client.publish(
                    row.subject,
                    row.payload,
                    reply=self._prefix + token,
                    headers=row.headers(spans[index] if spans else None),
                )
        except BaseException:
            self._forget(group)
            raise
        return group

    async def acknowledgements(self, group: SentGroup, wait_seconds: float) -> list[Ack]:
        """Each message's answer, waiting up to `wait_seconds` for all of them; one still
        unanswered then is a TimeoutError (it may yet be stored: a retry's duplicate is
        dropped by JetStream)."""
        if not group.answered.done():
            await asyncio.wait([group.answered], timeout=wait_seconds)
        self._forget(group)
        return [TimeoutError("no acknowledgement") if ack is None else ack for ack in group.acks]

    def _forget(self, group: SentGroup) -> None:
        for token in group.tokens:
            self._waiting.pop(token, None)

    async def _listen(self, client: Client) -> None:
        if self._subscription is not None:
            with contextlib.suppress(NatsError, OSError):
                await self._subscription.unsubscribe()
        for group, index in self._waiting.values():
            group.settle(index, ConnectionError("the NATS client was replaced"))
        self._waiting.clear()
        self._prefix = client.new_inbox() + "."
        self._subscription = await client.subscribe(self._prefix + "*", cb=self._acknowledged)
        self._client = client

    async def _acknowledged(self, message: Msg) -> None:
        waiting = self._waiting.pop(message.subject.rpartition(".")[2], None)
        if waiting is None:
            return
        group, index = waiting
        # A PubAck is small JSON with a "seq"; reading only that skips json's decoder.
        if b'"error"' not in message.data and (stored := _PUB_ACK_SEQ.search(message.data)):
            group.settle(index, int(stored[1]))
            return
        try:
            answer = json.loads(message.data)
        except ValueError:
            group.settle(index, StoreRefused(f"not a PubAck: {message.data[:200]!r}"))
            return
        if "error" in answer or "seq" not in answer:
            group.settle(index, StoreRefused(str(answer.get("error", answer))))
        else:
            group.settle(index, int(answer["seq"]))


@dataclass(frozen=True)
class OutboxMetrics:
    lag_seconds: Gauge
    depth: Gauge
    published: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> OutboxMetrics:
        return cls(
            lag_seconds=Gauge(
                "marketplace_outbox_lag_seconds",
                "Age of the oldest event not yet published to NATS (0 when none waits)",
                registry=registry,
                multiprocess_mode="livemax",
            ),
            depth=Gauge(
                "marketplace_outbox_depth",
                "Events in the outbox not yet published to NATS",
                registry=registry,
                multiprocess_mode="livemax",
            ),
            published=Counter(
                "marketplace_outbox_published_total",
                "Outbox events published to NATS and marked",
                registry=registry,
            ),
        )


@dataclass(frozen=True)
class OutboxRow:
    position: int
    event_id: str
    aggregate: tuple[str, str]
    subject: str
    type_name: str
    payload: bytes
    # The trace context of the work that wrote the event (server/tracing.py), or None.
    traceparent: str | None = None

    def headers(self, span: Span | None = None) -> dict[str, str]:
        # Only what a consumer needs: nats-py encodes each header in Python, about 2 us of
        # the relay's CPU apiece per event (docs/benchmarks.md). The publish's span, when
        # traced, is the parent of the consumers' spans.
        headers = {MSG_ID_HEADER: self.event_id, EVENT_TYPE_HEADER: self.type_name}
        if span is not None:
            inject(headers, trace.set_span_in_context(span))
        return headers


@dataclass(frozen=True)
class RelaySettings:
    batch_size: int = 500
    # Between polls that found rows (fewer than a batch); with none, the wait doubles up
    # to the idle interval.
    busy_poll_seconds: float = 0.25
    idle_poll_seconds: float = 0.5
    leader_retry_seconds: float = 2.0
    publish_timeout_seconds: float = 5.0
    outbox_retention_seconds: float = 7 * 24 * 3600.0
    inbox_retention_seconds: float = 30 * 24 * 3600.0
    prune_interval_seconds: float = 60.0


class Relay:
    def __init__(
        self,
        connect: Connect,
        nats: NatsConnection,
        metrics: OutboxMetrics,
        settings: RelaySettings,
        *,
        tracer: Tracer | None = None,
    ) -> None:
        self._connect = connect
        # None with tracing off: no span, and no header beyond the two above.
        self._tracer = tracer
        self._nats = nats
        self._metrics = metrics
        self._settings = settings
        # Stored by JetStream, not marked yet: marked first thing on the next connection,
        # never published again (the duplicate window may have passed by then).
        self._unmarked: list[int] = []
        self._publisher = AckedPublisher()
        self._next_prune = 0.0
        self._next_metrics = 0.0
        self._clock = time.monotonic

    async def run(self) -> None:
        """Until cancelled: takes the lead when it can, publishes while it has it."""
        backoff = Backoff(_RETRY_FIRST_SECONDS, _RETRY_MAX_SECONDS)
        while True:
            raise_if_cancelled()
            began = self._clock()
            try:
                conn = await self._connect()
                async with conn:
                    await self._follow_then_lead(conn)
            except (psycopg.Error, OSError) as error:
                _log.warning("outbox relay lost the database", error=repr(error))
            # The loop outlives any one failure (a bug included) and says what it was; its
            # session, and so the lead, ended with the block.
            except Exception:
                _log.exception("outbox relay failed")
            # Backing off by how long the session lasted, not by whether it connected: a
            # failure that follows every successful connect (a bug, a row the relay cannot
            # read) would otherwise reconnect and log ten times a second.
            if self._clock() - began >= _HEALTHY_SESSION_SECONDS:
                backoff.reset()
            await backoff.wait()

    async def _follow_then_lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while not await self._try_lock(conn):
            await self._measure(conn)
            await asyncio.sleep(jittered(self._settings.leader_retry_seconds))
        _log.info("outbox relay leads")
        await self._lead(conn)

    async def _try_lock(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        row = await (await conn.execute(_TRY_LOCK, {"key": RELAY_LOCK_KEY})).fetchone()
        return bool(row and row[0])

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        idle = self._settings.busy_poll_seconds
        unstored = Backoff(2 * _RETRY_FIRST_SECONDS, _RETRY_MAX_SECONDS)
        while True:
            raise_if_cancelled()
            await self._mark_published(conn, self._unmarked)
            self._metrics.published.inc(len(self._unmarked))
            self._unmarked = []
            await self._housekeeping(conn)
            rows = await self._unpublished(conn)
            if not rows:
                await asyncio.sleep(idle)
                idle = min(idle * 2, self._settings.idle_poll_seconds)
                continue
            stored = await self._publish(rows)
            self._unmarked = stored
            if len(stored) < len(rows):
                # NATS is away or refusing: back off, keep the lead (and the order).
                await self._measure(conn, force=True)
                await unstored.wait()
                continue
            unstored.reset()
            idle = self._settings.busy_poll_seconds
            if len(rows) < self._settings.batch_size:
                await asyncio.sleep(self._settings.busy_poll_seconds)

    async def _unpublished(self, conn: psycopg.AsyncConnection[Any]) -> list[OutboxRow]:
        cursor = await conn.execute(_UNPUBLISHED, {"limit": self._settings.batch_size}, binary=True)
        return [
            OutboxRow(
                position=position,
                event_id=event_id,
                aggregate=(aggregate_type, aggregate_id),
                subject=subject,
                type_name=type_name,
                payload=payload,
                traceparent=traceparent,
            )
            for (
                position,
                event_id,
                aggregate_id,
                aggregate_type,
                subject,
                type_name,
                payload,
                traceparent,
            ) in await cursor.fetchall()
        ]

    async def _publish(self, rows: Sequence[OutboxRow]) -> list[int]:
        """Publishes `rows` in order; the positions JetStream stored (or already had), a
        prefix of them per aggregate."""
        if not self._nats.is_ready:
            return []
        try:
            async with asyncio.timeout(1.0):
                client, _jetstream = await self._nats.ready()
        except TimeoutError:
            return []
        stored: list[int] = []
        failed: set[tuple[str, str]] = set()
        aggregates = len({row.aggregate for row in rows})
        for group in _pipelined_groups(rows):
            sendable = [row for row in group if row.aggregate not in failed]
            spans = [self._publish_span(row) for row in sendable]
            try:
                sent = await self._publisher.send(client, sendable, spans)
            except (NatsError, OSError) as error:
                _log.warning("outbox publish failed", error=repr(error))
                _end_spans(spans, [error] * len(spans))
                self._nats.lost()
                return stored
            acks = await self._publisher.acknowledgements(
                sent, self._settings.publish_timeout_seconds
            )
            _end_spans(spans, acks)
            for row, ack in zip(sendable, acks, strict=True):
                if isinstance(ack, int):
                    stored.append(row.position)
                else:
                    failed.add(row.aggregate)
            if len(failed) == aggregates:
                break
        if failed:
            _log.warning("outbox publish unacknowledged", events=len(rows) - len(stored))
            self._nats.lost()
        return stored

    def _publish_span(self, row: OutboxRow) -> Span | None:
        """A span from sending `row` to its acknowledgement, in the trace of the work that
        wrote it (a new trace for a row written outside one)."""
        if self._tracer is None:
            return None
        aggregate_type, aggregate_id = row.aggregate
        attributes: dict[str, str] = {
            "messaging.system": "nats",
            "messaging.destination.name": row.subject,
            "messaging.message.id": row.event_id,
            "marketplace.event_type": row.type_name,
        }
        if aggregate_type == "order":
            attributes[ORDER_ID] = aggregate_id
        return self._tracer.start_span(
            f"{row.subject} publish",
            context=extracted({TRACEPARENT: row.traceparent}) if row.traceparent else None,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        )

    async def _mark_published(
        self, conn: psycopg.AsyncConnection[Any], positions: Sequence[int]
    ) -> None:
        if positions:
            await conn.execute(_MARK_PUBLISHED, {"positions": list(positions)})

    async def _housekeeping(self, conn: psycopg.AsyncConnection[Any]) -> None:
        now = time.monotonic()
        await self._measure(conn)
        if now >= self._next_prune:
            self._next_prune = now + self._settings.prune_interval_seconds
            await self.prune(conn)

    async def prune(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Deletes published rows older than the retention, and inbox rows older than
        theirs; the outbox rows deleted."""
        pruned = 0
        for statement, age in (
            (_PRUNE_OUTBOX, self._settings.outbox_retention_seconds),
            (_PRUNE_INBOX, self._settings.inbox_retention_seconds),
        ):
            while True:
                cursor = await conn.execute(statement, {"age": age, "limit": _PRUNE_CHUNK})
                if statement is _PRUNE_OUTBOX:
                    pruned += cursor.rowcount
                if cursor.rowcount < _PRUNE_CHUNK:
                    break
        if pruned:
            _log.info("outbox pruned", rows=pruned)
        return pruned

    async def _measure(self, conn: psycopg.AsyncConnection[Any], *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_metrics:
            return
        self._next_metrics = now + _METRICS_EVERY_SECONDS
        row = await (await conn.execute(_BACKLOG)).fetchone()
        if row is not None:
            depth, lag = row
            self._metrics.depth.set(depth)
            self._metrics.lag_seconds.set(float(lag))


def _end_spans(spans: Sequence[Span | None], acks: Sequence[Ack]) -> None:
    for span, ack in zip(spans, acks, strict=True):
        if span is None:
            continue
        if isinstance(ack, BaseException):
            span.set_status(Status(StatusCode.ERROR, repr(ack)))
        else:
            span.set_attribute("messaging.nats.stream_sequence", ack)
        span.end()


def _pipelined_groups(rows: Sequence[OutboxRow]) -> list[list[OutboxRow]]:
    """`rows` cut, in order, into groups with at most one event per aggregate: a group is
    sent at once, the next only once the previous one is acknowledged."""
    groups: list[list[OutboxRow]] = [[]]
    seen: set[tuple[str, str]] = set()
    for row in rows:
        if row.aggregate in seen:
            groups.append([])
            seen = set()
        groups[-1].append(row)
        seen.add(row.aggregate)
    return groups
