"""Dead letters: listing the MARKETPLACE_DLQ stream and replaying one through its consumer.

A replay runs the registered consumer's handler in this process on the dead letter's data,
with the original delivery's inbox id, so the effect is applied at most once however often
it is replayed (or was applied meanwhile); once applied, the dead letter leaves the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError as StreamMessageNotFound
from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.domain.errors import (
    ErrorReason,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    check_replay,
)
from server.domain.identity import Principal
from server.domain.pagination import decode_page_token, encode_page_token, invalid_page_token
from server.domain.validation import Violations, check_request_id
from server.events.consumers import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_CONSUMER,
    DEAD_LETTER_ERROR,
    DEAD_LETTER_MESSAGE_ID,
    DEAD_LETTER_ORIGINAL_SEQUENCE,
    DEAD_LETTER_ORIGINAL_STREAM,
    DEAD_LETTER_ORIGINAL_SUBJECT,
    EVENT_TYPE_HEADER,
    ConsumerSpec,
    Delivery,
    describe,
)
from server.events.nats import (
    DEAD_LETTER_STREAM,
    DEAD_LETTER_SUBJECT_PREFIX,
    EventsUnavailable,
    NatsConnection,
)

_log = structlog.get_logger("marketplace.dead_letters")
_PAGE_KIND = "deadLetters"
_WAIT_FOR_NATS_SECONDS = 2.0
# One stream-info request per worker this often: cheap, and alerts look at minutes.
_COUNT_INTERVAL_SECONDS = 15.0

_EARLIER_REPLAY = text(
    """
    SELECT dead_letter_id, subject, headers, data, create_time
      FROM dead_letter_replays
     WHERE caller = :caller AND request_id = :request_id
    """
)
_RECORD_REPLAY = text(
    """
    INSERT INTO dead_letter_replays
           (caller, request_id, dead_letter_id, subject, headers, data, create_time)
    VALUES (:caller, :request_id, :dead_letter_id, :subject, CAST(:headers AS jsonb), :data,
            :create_time)
    ON CONFLICT DO NOTHING
    """
)


@dataclass(frozen=True)
class DeadLetter:
    id: int
    consumer: str
    error: str
    attempts: int
    original_stream: str
    original_subject: str
    original_sequence: int
    message_id: str
    event_type: str
    create_time: datetime
    subject: str
    headers: Mapping[str, str]
    data: bytes

    @classmethod
    def of(
        cls,
        sequence: int,
        subject: str,
        headers: Mapping[str, str],
        data: bytes,
        create_time: datetime,
    ) -> DeadLetter:
        return cls(
            id=sequence,
            consumer=headers.get(
                DEAD_LETTER_CONSUMER, subject.removeprefix(DEAD_LETTER_SUBJECT_PREFIX)
            ),
            error=headers.get(DEAD_LETTER_ERROR, ""),
            attempts=_int(headers.get(DEAD_LETTER_ATTEMPTS)),
            original_stream=headers.get(DEAD_LETTER_ORIGINAL_STREAM, ""),
            original_subject=headers.get(DEAD_LETTER_ORIGINAL_SUBJECT, ""),
            original_sequence=_int(headers.get(DEAD_LETTER_ORIGINAL_SEQUENCE)),
            message_id=headers.get(DEAD_LETTER_MESSAGE_ID, ""),
            event_type=headers.get(EVENT_TYPE_HEADER, ""),
            create_time=create_time,
            subject=subject,
            headers=dict(headers),
            data=data,
        )

    def delivery(self) -> Delivery:
        """The delivery a replay hands the consumer's handler: the original message, one
        attempt past the last."""
        return Delivery(
            subject=self.original_subject,
            headers=self.headers,
            data=self.data,
            attempt=self.attempts + 1,
            message_id=self.message_id,
        )


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def parse_dead_letter_id(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 2**63:
        raise InvalidArgument([FieldViolation("id", "must be a dead letter's id, e.g. 42")])
    return int(value)


class DeadLetters:
    def __init__(
        self,
        nats: NatsConnection,
        engine: AsyncEngine,
        specs: Sequence[ConsumerSpec],
    ) -> None:
        self._nats = nats
        self._engine = engine
        self._specs = {spec.name: spec for spec in specs}

    async def list_dead_letters(
        self, page_size: int, page_token: str, consumer: str = ""
    ) -> tuple[list[DeadLetter], str]:
        """Oldest first; the next page's token, empty after the last."""
        position = decode_page_token(page_token, _PAGE_KIND, consumer)
        after = 0
        if position is not None:
            after = position.get("after", 0)
            # Within a stream sequence (JetStream refuses 2**64 - 1 and up as a bad request,
            # which would read as UNAVAILABLE): tokens are not signed, so this is input.
            if type(after) is not int or not 0 <= after < 2**63:
                raise invalid_page_token()
        subjects = DEAD_LETTER_SUBJECT_PREFIX + (consumer or ">")
        jetstream = await self._jetstream()
        letters: list[DeadLetter] = []
        with _nats_errors():
            while len(letters) <= page_size:
                try:
                    message = await jetstream.get_msg(
                        DEAD_LETTER_STREAM, seq=after + 1, subject=subjects, next=True
                    )
                except StreamMessageNotFound:
                    break
                letters.append(_dead_letter(message))
                after = letters[-1].id
        if len(letters) <= page_size:
            return letters, ""
        page = letters[:page_size]
        return page, encode_page_token(_PAGE_KIND, consumer, {"after": page[-1].id})

    async def replay_dead_letter(
        self, caller: Principal, dead_letter_id: int, request_id: str
    ) -> DeadLetter:
        """Applies the dead letter through its consumer (at most once), then removes it.
        FailedPrecondition when the consumer fails on it again, or is not run here."""
        violations = Violations()
        check_request_id(violations, "request_id", request_id, required=True)
        violations.raise_if_any()
        earlier = await self._earlier_replay(caller, request_id)
        if earlier is not None:
            check_replay(request_id, str(earlier.id), str(dead_letter_id))
            return earlier
        jetstream = await self._jetstream()
        with _nats_errors():
            try:
                message = await jetstream.get_msg(DEAD_LETTER_STREAM, seq=dead_letter_id)
            except StreamMessageNotFound:
                raise NotFound("dead letter", str(dead_letter_id)) from None
        letter = _dead_letter(message)
        spec = self._specs.get(letter.consumer)
        if spec is None:
            raise FailedPrecondition(
                f"this server runs no consumer {letter.consumer!r}",
                reason=ErrorReason.CONSUMER_NOT_RUNNING,
                metadata={"consumer": letter.consumer},
            )
        try:
            await spec.handle(letter.delivery())
        # The handler's failure, whatever it is, is the answer: the dead letter stays.
        except Exception as error:
            _log.info("replay failed", consumer=letter.consumer, dead_letter=letter.id)
            raise FailedPrecondition(
                f"consumer {letter.consumer!r} still fails: {describe(error)}",
                reason=ErrorReason.DEAD_LETTER_STILL_FAILS,
                metadata={"consumer": letter.consumer, "deadLetterId": str(letter.id)},
            ) from error
        await self._record_replay(caller, request_id, letter)
        # Already gone: a concurrent replay removed it (the inbox applied it once).
        with _nats_errors(), contextlib.suppress(StreamMessageNotFound):
            await jetstream.delete_msg(DEAD_LETTER_STREAM, letter.id)
        _log.info("dead letter replayed", consumer=letter.consumer, dead_letter=letter.id)
        return letter

    async def _jetstream(self) -> JetStreamContext:
        try:
            async with asyncio.timeout(_WAIT_FOR_NATS_SECONDS):
                _client, jetstream = await self._nats.ready()
        except TimeoutError:
            raise EventsUnavailable("NATS is not connected") from None
        return jetstream

    async def _earlier_replay(self, caller: Principal, request_id: str) -> DeadLetter | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    _EARLIER_REPLAY, {"caller": caller.subject, "request_id": request_id}
                )
            ).first()
        if row is None:
            return None
        headers: dict[str, str] = row.headers
        return DeadLetter.of(
            row.dead_letter_id, row.subject, headers, bytes(row.data), row.create_time
        )

    async def _record_replay(self, caller: Principal, request_id: str, letter: DeadLetter) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                _RECORD_REPLAY,
                {
                    "caller": caller.subject,
                    "request_id": request_id,
                    "dead_letter_id": letter.id,
                    "subject": letter.subject,
                    "headers": json.dumps(dict(letter.headers)),
                    "data": letter.data,
                    "create_time": letter.create_time,
                },
            )


@dataclass(frozen=True)
class DeadLetterMetrics:
    waiting: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> DeadLetterMetrics:
        return cls(
            waiting=Gauge(
                "marketplace_dead_letters",
                "Dead letters waiting in MARKETPLACE_DLQ for an admin, by consumer",
                ["consumer"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        )


async def count_dead_letters(
    nats: NatsConnection,
    metrics: DeadLetterMetrics,
    interval_seconds: float = _COUNT_INTERVAL_SECONDS,
) -> None:
    """Until cancelled, sets `marketplace_dead_letters` from the stream's per-subject
    counts: the counter of dead-lettered deliveries cannot tell which were replayed since."""
    counted: set[str] = set()
    while True:
        _client, jetstream = await nats.ready()
        try:
            info = await jetstream.stream_info(
                DEAD_LETTER_STREAM, subjects_filter=DEAD_LETTER_SUBJECT_PREFIX + ">"
            )
        except (NatsError, OSError, TimeoutError) as error:
            # The connection's own task notices a lost NATS; the next pass counts again.
            _log.debug("dead letters not counted", error=repr(error))
        else:
            waiting = {
                subject.removeprefix(DEAD_LETTER_SUBJECT_PREFIX): count
                for subject, count in (info.state.subjects or {}).items()
            }
            # A consumer whose letters were all replayed drops out of the answer: back to 0.
            for consumer in counted | waiting.keys():
                metrics.waiting.labels(consumer).set(waiting.get(consumer, 0))
            counted |= waiting.keys()
        await asyncio.sleep(interval_seconds)


def _dead_letter(message: RawStreamMsg) -> DeadLetter:
    headers: dict[str, Any] = message.headers or {}
    return DeadLetter.of(
        message.seq or 0,
        message.subject or "",
        {str(name): str(value) for name, value in headers.items()},
        message.data or b"",
        message.time or datetime.now(UTC),
    )


@contextlib.contextmanager
def _nats_errors() -> Iterator[None]:
    """NATS failing under a call: EventsUnavailable (UNAVAILABLE, retryable)."""
    try:
        yield
    except StreamMessageNotFound:
        raise
    except (NatsError, OSError, TimeoutError) as error:
        raise EventsUnavailable(repr(error)) from error
