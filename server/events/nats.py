"""The server's NATS connection and the JetStream streams it relies on.

NATS is never on the path of a call: the server starts and serves without it, and the
connection is made, and made again, in the background for as long as the process runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import nats
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from server.events.backoff import Backoff

MARKETPLACE_STREAM = "MARKETPLACE"
DEAD_LETTER_STREAM = "MARKETPLACE_DLQ"
WAREHOUSE_STREAM = "WAREHOUSE"
DEAD_LETTER_SUBJECT_PREFIX = "marketplace.dlq."
# Within this window JetStream drops a message whose Nats-Msg-Id it already stored: a relay
# that died between publishing and marking its rows re-publishes them harmlessly.
DUPLICATE_WINDOW_SECONDS = 120.0

STREAMS = (
    # Not `marketplace.>`: it would overlap the dead-letter stream's subjects, which
    # JetStream refuses.
    StreamConfig(
        name=MARKETPLACE_STREAM,
        description="Events of the marketplace, published from the outbox",
        subjects=[
            "marketplace.order.>",
            "marketplace.payment.>",
            "marketplace.inventory.>",
            "marketplace.fulfilment.>",
        ],
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    ),
    StreamConfig(
        name=DEAD_LETTER_STREAM,
        description="Messages a consumer gave up on: marketplace.dlq.<consumer>",
        subjects=[DEAD_LETTER_SUBJECT_PREFIX + ">"],
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    ),
    StreamConfig(
        name=WAREHOUSE_STREAM,
        description="Messages from the external warehouse (stock levels, shipments)",
        subjects=["warehouse.>"],
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    ),
)
_ERROR_LOG_INTERVAL_SECONDS = 30.0
# The longest wait between tries to connect (and create the streams) while NATS is away.
_MAX_RECONNECT_WAIT_SECONDS = 10.0
# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058

_log = structlog.get_logger("marketplace.nats")


def raise_if_cancelled() -> None:
    """nats-py swallows a CancelledError that arrives inside some of its awaits (flushing,
    reconnecting): a loop around its calls checks here that nobody asked it to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class EventsUnavailable(Exception):
    """NATS did not answer a call that needs it (the dead-letter RPCs): UNAVAILABLE."""


class NatsConnection:
    """One NATS connection per process, shared by the relay and the consumers.

    `run()` (a background task) connects with backoff until NATS answers, makes sure the
    streams exist, and does both again after every reconnect (a NATS that came back without
    its store has lost them); nats-py itself reconnects forever once connected.
    `ready()` waits until a connection with the streams in place is up.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "marketplace",
        connect_timeout_seconds: float = 2.0,
        reconnect_wait_seconds: float = 1.0,
    ) -> None:
        self._url = url
        # NATS_URL may list a cluster's nodes, comma-separated: nats-py tries them in turn
        # and fails over to another when its node goes.
        self._servers = [server.strip() for server in url.split(",") if server.strip()]
        self._name = name
        self._connect_timeout = connect_timeout_seconds
        self._reconnect_wait = reconnect_wait_seconds
        self._client: Client | None = None
        self._jetstream: JetStreamContext | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._generation = 0
        self._next_error_log = 0.0
        self._closing = False

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    @property
    def generation(self) -> int:
        """Counts the times the streams were set up: a consumer whose generation is older
        binds its durable again (a NATS that came back without its store lost it)."""
        return self._generation

    async def ready(self) -> tuple[Client, JetStreamContext]:
        """The connection and its JetStream context, once connected with the streams set up."""
        while True:
            await self._ready.wait()
            if self._client is not None and self._jetstream is not None:
                return self._client, self._jetstream

    def lost(self) -> None:
        """Called by a user whose request failed on the connection: until `run` has set the
        streams up again, `ready()` waits."""
        self._ready.clear()
        self._changed.set()

    async def run(self) -> None:
        """Until cancelled; closes the connection then."""
        try:
            backoff = Backoff(self._reconnect_wait, _MAX_RECONNECT_WAIT_SECONDS)
            while True:
                raise_if_cancelled()
                try:
                    if self._client is None or self._client.is_closed:
                        self._client = await self._connect()
                        self._jetstream = self._client.jetstream()
                    if self._client.is_connected and not self._ready.is_set():
                        await ensure_streams(
                            self._jetstream_context(), replicas=stream_replicas(self._servers)
                        )
                        self._generation += 1
                        self._ready.set()
                        _log.info("nats ready", url=self._url)
                    backoff.reset()
                except (nats.errors.Error, OSError, TimeoutError) as error:
                    self._ready.clear()
                    _log.warning("nats unavailable", url=self._url, error=repr(error))
                    await backoff.wait()
                    continue
                self._changed.clear()
                # Woken by a disconnect, a reconnect, or a user's failure; looked at again
                # every second in any case.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._changed.wait()
        finally:
            self._ready.clear()
            self._closing = True
            if self._client is not None and not self._client.is_closed:
                # Best effort on the way out: whatever closing fails on, the process goes on
                # stopping.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await self._client.close()

    def _jetstream_context(self) -> JetStreamContext:
        assert self._jetstream is not None
        return self._jetstream

    async def _connect(self) -> Client:
        async def disconnected() -> None:
            self._ready.clear()
            self._changed.set()
            if not self._closing:  # closing it ourselves is no news
                _log.warning("nats disconnected", url=self._url)

        async def reconnected() -> None:
            self._changed.set()
            _log.info("nats reconnected", url=self._url)

        async def error(error: Exception) -> None:
            # nats-py retries every reconnect wait and reports each failure: said once a
            # while, not every second.
            now = time.monotonic()
            if now >= self._next_error_log:
                self._next_error_log = now + _ERROR_LOG_INTERVAL_SECONDS
                _log.warning("nats unavailable", url=self._url, error=repr(error))

        return await nats.connect(
            self._servers,
            name=self._name,
            # Every subject this connection uses is the server's own (outbox rows, stream
            # and consumer names): two regex searches per relayed event spared.
            skip_subject_validation=True,
            connect_timeout=int(max(1, self._connect_timeout)),
            reconnect_time_wait=int(max(1, self._reconnect_wait)),
            # Once connected, nats-py reconnects forever by itself.
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )


def stream_replicas(servers: list[str]) -> int:
    """Copies of each stream a new stream is created with: one per node NATS_URL lists, at
    most 3 (a quorum survives one node lost; JetStream allows 5 at most)."""
    return max(1, min(len(servers), 3))


async def ensure_streams(jetstream: JetStreamContext, *, replicas: int = 1) -> None:
    """Creates the streams (with `replicas` copies each, on a cluster), or puts back their
    subjects and duplicate window: idempotent, safe with every server process doing it at
    once, and leaving alone what an operator set (limits, replicas)."""
    for config in STREAMS:
        name = config.name or ""
        try:
            current = (await jetstream.stream_info(name)).config
        except NotFoundError:
            try:
                await jetstream.add_stream(dataclasses.replace(config, num_replicas=replicas))
                continue
            except BadRequestError as error:
                if error.err_code != _STREAM_NAME_IN_USE:
                    raise
            current = (await jetstream.stream_info(name)).config
        if (
            sorted(current.subjects or []) != sorted(config.subjects or [])
            or current.duplicate_window != config.duplicate_window
        ):
            current.subjects = config.subjects
            current.duplicate_window = config.duplicate_window
            await jetstream.update_stream(current)
