"""serve() closes what it opened however it ends: its pools' and listener's connections,
and its tasks, also when starting fails or it is cancelled (server/app.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import AsyncIterator, Iterator

import grpc
import psycopg
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.postgres import create_database, drop_database
from server.api.health import DatabaseHealth
from server.app import serve
from server.settings import Settings
from tests.conftest import JWT_SECRET, eventually
from tests.stack import WEBHOOK_SECRET

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# What serve() holds while it runs: the hot-path pool's connections (one order runner, the
# product-lookup runner, one spare) and the product-change listener's.
_HOT_PATH_AND_LISTENER = 3 + 1


@pytest.fixture(scope="module")
def server_database(postgres_server_url: str) -> Iterator[str]:
    """A database of its own: every connection to it is the server's, and its upkeep
    touches no other test's rows."""
    url = create_database(postgres_server_url, "marketplace_serve")
    yield url
    drop_database(postgres_server_url, url)


@pytest.fixture
def settings(server_database: str) -> Iterator[Settings]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging_config = structlog.get_config()
    yield Settings(
        DATABASE_URL=server_database,
        MARKETPLACE_JWT_SECRET=JWT_SECRET,
        GRPC_HOST="127.0.0.1",
        GRPC_PORT=port,
        METRICS_PORT=0,
        ORDER_BATCH_RUNNERS=1,
        STRIPE_API_BASE="http://127.0.0.1:9",  # nothing listens: upkeep's calls fail at once
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        PROVIDER_TIMEOUT=1,
        PROVIDER_MAX_ATTEMPTS=1,
        SHUTDOWN_GRACE=0,
        LOG_LEVEL="WARNING",
    )
    structlog.configure(**logging_config)  # serve() configures logging for the whole process
    gc.unfreeze()  # and freezes what it found in the collector, this test process's too


async def _server_connections(database_url: str) -> tuple[int, bool]:
    """How many connections the server holds, and whether its listener has listened."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE query LIKE '%pg_notification_queue_usage%')"
            " FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'marketplace'"
        )
        row = await cursor.fetchone()
    assert row is not None
    return row[0], row[1] > 0


async def _opened(database_url: str) -> None:
    """Waits for the hot path's connections and the listener's, listening."""

    async def connected() -> bool:
        count, listened = await _server_connections(database_url)
        return count >= _HOT_PATH_AND_LISTENER and listened

    await eventually(connected, within=10, what="the server's connections")


async def _all_closed(database_url: str) -> None:
    # A connect cancelled halfway (by a stop during a read that was connecting) leaves its
    # connection to the garbage collector, in psycopg: unreachable, not left open.
    gc.collect()

    async def closed() -> bool:
        count, _ = await _server_connections(database_url)
        return count == 0

    await eventually(closed, within=5, what="the server's connections to close")


def _still_running(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    return {task for task in asyncio.all_tasks() - before if not task.done()}


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.asynccontextmanager
async def _nothing_left_behind(settings: Settings) -> AsyncIterator[None]:
    """After the block: serve()'s connections are closed, its tasks over and its port free.
    Whatever a failing test leaves running is cancelled, or it would outlive the test in
    the session's event loop."""
    before = asyncio.all_tasks()
    try:
        yield
        await _all_closed(settings.database_url)
        assert not _still_running(before)
        assert _port_free(settings.grpc_port)
    finally:
        left = _still_running(before)
        for task in left:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*left, return_exceptions=True), timeout=5)


async def test_a_start_that_fails_closes_what_it_opened(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    class HealthCheckBroke(Exception):
        pass

    async def check_after_connecting(health: DatabaseHealth) -> bool:
        await _opened(settings.database_url)
        raise HealthCheckBroke

    monkeypatch.setattr(DatabaseHealth, "check_once", check_after_connecting)
    async with _nothing_left_behind(settings):
        with pytest.raises(HealthCheckBroke):
            await serve(settings)


async def test_a_cancelled_server_closes_what_it_opened(settings: Settings) -> None:
    async with _nothing_left_behind(settings):
        serving = asyncio.create_task(serve(settings))
        await _until_serving(f"{settings.grpc_host}:{settings.grpc_port}")
        await _opened(settings.database_url)

        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving


async def _until_serving(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
            return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

        await eventually(serving, within=10, what="the server to answer SERVING")
