"""The outbox relay in a process of its own (OUTBOX_RELAY=process, the default when a
supervisor runs several workers). It also keeps `marketplace_dead_letters` current, the
other task a server needs once rather than once per worker.

The relay's CPU is publishing: nats-py's Python per event, its acks, the reads and marks.
Inside a worker it shares that worker's event loop and core with the calls it serves; here
it runs at a lower CPU priority (OUTBOX_RELAY_NICE), so when the machine is saturated, as in
a flash sale, the kernel gives the order path the CPU first and the events wait in the
outbox, committed, until there is CPU to spare (outbox lag and depth are on /metrics, with
an alert). Leadership is unchanged: the advisory lock, so every replica's relay process can
run at once and one publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import structlog
import uvloop
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry

from server.db.engine import dedicated_connection
from server.events.dead_letters import DeadLetterMetrics, count_dead_letters
from server.events.nats import NatsConnection
from server.events.relay import OutboxMetrics, Relay, RelaySettings
from server.observability import configure_logging
from server.services.upkeep import stop_task
from server.settings import Settings
from server.tracing import install_tracing, log_processors, tracer_of

_log = structlog.get_logger("marketplace.relay")


def dedicated_connection_of(
    settings: Settings,
) -> Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]:
    """DATABASE_URL's session outside the pools (server/db/engine.py), with the server's
    connect and statement timeouts."""
    return dedicated_connection(
        settings.database_url,
        connect_timeout_seconds=settings.db_connect_timeout_seconds,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )


def relay_from_settings(
    settings: Settings,
    nats_connection: NatsConnection,
    metrics: OutboxMetrics,
    tracer: Tracer | None,
) -> Relay:
    return Relay(
        # Its own session: the advisory lock that makes it the leader lives and dies with it.
        dedicated_connection_of(settings),
        nats_connection,
        metrics,
        RelaySettings(
            batch_size=settings.outbox_batch,
            busy_poll_seconds=settings.outbox_busy_poll_seconds,
            idle_poll_seconds=settings.outbox_idle_poll_seconds,
            leader_retry_seconds=settings.outbox_leader_retry_seconds,
            outbox_retention_seconds=settings.outbox_retention_seconds,
            inbox_retention_seconds=settings.inbox_retention_seconds,
            prune_interval_seconds=settings.outbox_prune_interval_seconds,
        ),
        tracer=tracer,
    )


async def run_relay(settings: Settings) -> None:
    """Publishes the outbox and counts dead letters until SIGTERM or SIGINT. Its metrics
    reach /metrics through the supervisor's folder of metric files, as the workers' do."""
    tracing = install_tracing(settings)
    configure_logging(settings.log_level, settings.log_format, log_processors(tracing))
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    nats_connection = NatsConnection(settings.nats_url, name="marketplace-relay")
    relay = relay_from_settings(
        settings, nats_connection, OutboxMetrics.create(CollectorRegistry()), tracer_of(tracing)
    )
    async with contextlib.AsyncExitStack() as running:
        if tracing is not None:
            running.callback(tracing.shutdown)
        # Stopped in the reverse order: the relay before its connection.
        running.push_async_callback(stop_task, asyncio.create_task(nats_connection.run()))
        running.push_async_callback(stop_task, asyncio.create_task(relay.run()))
        dead_letters = DeadLetterMetrics.create(CollectorRegistry())
        running.push_async_callback(
            stop_task, asyncio.create_task(count_dead_letters(nats_connection, dead_letters))
        )
        _log.info("outbox relay process started", nice=os.nice(0))
        await stopping.wait()
    _log.info("outbox relay process stopped")


def main(settings: Settings) -> None:
    # Raised by the process itself, not by the supervisor's fork (preexec_fn is unsafe with
    # threads); only upward, so nothing but root is needed.
    os.nice(settings.outbox_relay_nice)
    if settings.event_loop == "uvloop":
        uvloop.run(run_relay(settings))
    else:
        asyncio.run(run_relay(settings))
