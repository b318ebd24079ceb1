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

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry.trace import SpanKind, Tracer
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.events.backoff import Backoff, jittered
from server.events.nats import (
    DEAD_LETTER_STREAM,
    DEAD_LETTER_SUBJECT_PREFIX,
    NatsConnection,
    raise_if_cancelled,
)
from server.tracing import extracted

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
    # What the inbox keys on: the Nats-Msg-Id header (an event's id), else
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


# What a dead letter carries besides the original data and headers.
DEAD_LETTER_CONSUMER = "Marketplace-Dead-Letter-Consumer"
DEAD_LETTER_ERROR = "Marketplace-Dead-Letter-Error"
DEAD_LETTER_ATTEMPTS = "Marketplace-Dead-Letter-Attempts"
DEAD_LETTER_ORIGINAL_SUBJECT = "Marketplace-Dead-Letter-Original-Subject"
DEAD_LETTER_ORIGINAL_STREAM = "Marketplace-Dead-Letter-Original-Stream"
DEAD_LETTER_ORIGINAL_SEQUENCE = "Marketplace-Dead-Letter-Original-Sequence"
# The inbox key of the original delivery, so a replay is applied at most once with it.
DEAD_LETTER_MESSAGE_ID = "Marketplace-Dead-Letter-Message-Id"
_ERROR_HEADER_LIMIT = 1000
_IDLE_FETCH_SECONDS = 1.0
# The longest wait before a consumer subscribes again after NATS or its handler failed.
_MAX_RESUBSCRIBE_SECONDS = 10.0

_log = structlog.get_logger("marketplace.consumers")


@dataclass(frozen=True)
class ConsumerSettings:
    # The attempt whose failure dead-letters a message (CONSUMER_MAX_DELIVER).
    max_deliver: int = 5
    # A delivery not acked within this time is delivered again (CONSUMER_ACK_WAIT).
    ack_wait_seconds: float = 30.0
    # The first redelivery after a failure waits this long, each next one twice as long
    # (CONSUMER_RETRY_DELAY), up to the maximum.
    retry_delay_seconds: float = 1.0
    max_retry_delay_seconds: float = 60.0
    fetch_batch: int = 10


@dataclass(frozen=True)
class ConsumerMetrics:
    messages: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ConsumerMetrics:
        return cls(
            messages=Counter(
                "marketplace_consumer_messages_total",
                "Deliveries to consumers by outcome: applied (acked; includes ones the inbox"
                " had already), retried (nak), dead_lettered",
                ["consumer", "outcome"],
                registry=registry,
            )
        )


def message_id(headers: Mapping[str, str], stream: str, stream_sequence: int) -> str:
    """The inbox key of a message (see Delivery.message_id)."""
    return headers.get(MSG_ID_HEADER) or f"{stream}:{stream_sequence}"


def dead_letter_headers(
    headers: Mapping[str, str],
    *,
    consumer: str,
    error: str,
    attempts: int,
    subject: str,
    stream: str,
    stream_sequence: int,
    inbox_id: str,
) -> dict[str, str]:
    """The original headers (without its Nats-Msg-Id: it would be taken for a duplicate of
    another consumer's dead letter of the same event) plus what went wrong."""
    kept = {name: value for name, value in headers.items() if name != MSG_ID_HEADER}
    return kept | {
        # A dead letter written twice for one delivery (the consumer died before it termed
        # the original) is stored once.
        MSG_ID_HEADER: f"{consumer}:{stream}:{stream_sequence}",
        DEAD_LETTER_CONSUMER: consumer,
        DEAD_LETTER_ERROR: _one_line(error),
        DEAD_LETTER_ATTEMPTS: str(attempts),
        DEAD_LETTER_ORIGINAL_SUBJECT: subject,
        DEAD_LETTER_ORIGINAL_STREAM: stream,
        DEAD_LETTER_ORIGINAL_SEQUENCE: str(stream_sequence),
        DEAD_LETTER_MESSAGE_ID: inbox_id,
    }


def _one_line(error: str) -> str:
    """Header values are one line."""
    flat = " ".join(error.split())
    return flat if len(flat) <= _ERROR_HEADER_LIMIT else flat[: _ERROR_HEADER_LIMIT - 3] + "..."


def describe(error: BaseException) -> str:
    if isinstance(error, Unprocessable):
        return error.reason
    return f"{type(error).__name__}: {error}"


class Consumers:
    """Runs every registered consumer on the process's NATS connection: one pull loop per
    consumer, its messages handled one after another."""

    def __init__(
        self,
        nats: NatsConnection,
        specs: Sequence[ConsumerSpec],
        settings: ConsumerSettings,
        metrics: ConsumerMetrics,
        *,
        tracer: Tracer | None = None,
    ) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"consumer names must be unique: {names}")
        self._nats = nats
        self._specs = list(specs)
        self._settings = settings
        self._metrics = metrics
        # None with tracing off: deliveries make no span.
        self._tracer = tracer

    @property
    def specs(self) -> list[ConsumerSpec]:
        return list(self._specs)

    async def run(self) -> None:
        """Until cancelled."""
        if not self._specs:
            return
        async with asyncio.TaskGroup() as tasks:
            for spec in self._specs:
                tasks.create_task(self._consume(spec), name=f"consumer-{spec.name}")

    def durable_config(self, spec: ConsumerSpec) -> ConsumerConfig:
        return ConsumerConfig(
            name=spec.name,
            durable_name=spec.name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._settings.ack_wait_seconds,
            # The framework counts attempts and dead-letters at CONSUMER_MAX_DELIVER itself:
            # with JetStream's own limit, a message whose last attempt died with its process
            # would stay unacked forever, in no stream anyone looks at.
            max_deliver=-1,
            filter_subjects=list(spec.filter_subjects),
        )

    async def _consume(self, spec: ConsumerSpec) -> None:
        backoff = Backoff(self._settings.retry_delay_seconds, _MAX_RESUBSCRIBE_SECONDS)
        while True:
            raise_if_cancelled()
            try:
                _client, jetstream = await self._nats.ready()
                generation = self._nats.generation
                await jetstream.add_consumer(spec.stream, self.durable_config(spec))
                subscription = await jetstream.pull_subscribe_bind(
                    durable=spec.name, stream=spec.stream
                )
                try:
                    while generation == self._nats.generation:
                        raise_if_cancelled()
                        try:
                            messages = await subscription.fetch(
                                self._settings.fetch_batch, timeout=_IDLE_FETCH_SECONDS
                            )
                        except TimeoutError:
                            continue
                        fetched = time.monotonic()
                        for index, message in enumerate(messages):
                            if time.monotonic() - fetched > self._settings.ack_wait_seconds / 2:
                                # Slow handlers (a blackholed SMTP server): the rest of the
                                # batch must not outlive its ack wait before its turn and be
                                # delivered again, an attempt counted though none was made.
                                for waiting in messages[index:]:
                                    await waiting.in_progress()
                                fetched = time.monotonic()
                            await self._process(spec, jetstream, message)
                        backoff.reset()
                finally:
                    with contextlib.suppress(NatsError, OSError):
                        await subscription.unsubscribe()
            except (NatsError, OSError) as error:
                _log.warning("consumer waits for NATS", consumer=spec.name, error=repr(error))
            # The loop outlives any one failure (a bug included) and says what it was: one
            # consumer's trouble must not stop the others, nor this one for good.
            except Exception:
                _log.exception("consumer failed", consumer=spec.name)
            await backoff.wait()

    async def _process(self, spec: ConsumerSpec, jetstream: JetStreamContext, msg: Msg) -> None:
        if self._tracer is None:
            await self._deliver(spec, jetstream, msg)
            return
        # A child of the relay's publish span, whose context the message's `traceparent`
        # header carries: the delivery, its database work and its email join the order's trace.
        metadata = msg.metadata
        with self._tracer.start_as_current_span(
            f"{spec.name} process",
            context=extracted(msg.headers or {}),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.consumer.group.name": spec.name,
                "messaging.destination.name": msg.subject,
                "messaging.nats.stream_sequence": metadata.sequence.stream,
                "messaging.message.delivery_attempt": metadata.num_delivered,
            },
        ):
            await self._deliver(spec, jetstream, msg)

    async def _deliver(self, spec: ConsumerSpec, jetstream: JetStreamContext, msg: Msg) -> None:
        metadata = msg.metadata
        headers = dict(msg.headers or {})
        stream_sequence = metadata.sequence.stream
        delivery = Delivery(
            subject=msg.subject,
            headers=headers,
            data=msg.data,
            attempt=metadata.num_delivered,
            message_id=message_id(headers, spec.stream, stream_sequence),
        )
        log = _log.bind(
            consumer=spec.name,
            subject=msg.subject,
            message_id=delivery.message_id,
            attempt=delivery.attempt,
        )
        if delivery.attempt > self._settings.max_deliver:
            # The last attempt ended without an answer: its process stopped meanwhile.
            await self._dead_letter(spec, jetstream, msg, delivery, "no answer from the handler")
            return
        try:
            await spec.handle(delivery)
        except Unprocessable as error:
            log.warning("unprocessable message", reason=error.reason)
            await self._dead_letter(spec, jetstream, msg, delivery, describe(error))
            return
        except asyncio.CancelledError:
            # The process is stopping: handed back now rather than after the ack wait.
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await msg.nak()
            raise
        # The one boundary where any handler failure is caught: the message is retried or
        # dead-lettered, and the consumer carries on with the next one.
        except Exception as error:
            if delivery.attempt >= self._settings.max_deliver:
                log.warning("handler failed, dead-lettering", error=describe(error))
                await self._dead_letter(spec, jetstream, msg, delivery, describe(error))
            else:
                log.info("handler failed, will retry", error=describe(error))
                await self._settle(msg.nak(delay=self._retry_delay(delivery.attempt)))
                self._metrics.messages.labels(spec.name, "retried").inc()
            return
        await self._settle(msg.ack())
        self._metrics.messages.labels(spec.name, "applied").inc()

    def _retry_delay(self, attempt: int) -> float:
        delay: float = self._settings.retry_delay_seconds * 2.0 ** (attempt - 1)
        return jittered(min(delay, self._settings.max_retry_delay_seconds))

    async def _dead_letter(
        self,
        spec: ConsumerSpec,
        jetstream: JetStreamContext,
        msg: Msg,
        delivery: Delivery,
        error: str,
    ) -> None:
        headers = dead_letter_headers(
            delivery.headers,
            consumer=spec.name,
            error=error,
            attempts=delivery.attempt,
            subject=delivery.subject,
            stream=spec.stream,
            stream_sequence=msg.metadata.sequence.stream,
            inbox_id=delivery.message_id,
        )
        try:
            await jetstream.publish(
                DEAD_LETTER_SUBJECT_PREFIX + spec.name,
                delivery.data,
                stream=DEAD_LETTER_STREAM,
                headers=headers,
            )
        except (NatsError, OSError) as failure:
            # Not termed: it comes back past max_deliver and is dead-lettered then.
            _log.warning("dead letter not written", consumer=spec.name, error=repr(failure))
            await self._settle(msg.nak(delay=self._settings.retry_delay_seconds))
            return
        await self._settle(msg.term())
        self._metrics.messages.labels(spec.name, "dead_lettered").inc()
        _log.warning(
            "dead letter",
            consumer=spec.name,
            subject=delivery.subject,
            message_id=delivery.message_id,
            attempts=delivery.attempt,
            error=error,
        )

    @staticmethod
    async def _settle(answer: Awaitable[None]) -> None:
        """An ack, nak or term that is lost with the connection only means a redelivery,
        which the inbox absorbs."""
        try:
            await answer
        except (NatsError, OSError) as error:
            _log.info("ack lost", error=repr(error))
