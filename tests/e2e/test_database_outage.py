"""PostgreSQL goes away mid-flight: calls get UNAVAILABLE, health says NOT_SERVING, and the
same server process serves again once the database is back, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.postgres import EmbeddedPostgres, create_database
from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from tests.conftest import Tokens, eventually, insert_product
from tests.e2e.statuses import details_of, status_of_rpc_error
from tests.stack import bearer, server_env

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_postgres() -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A PostgreSQL of this test's own, since stopping the shared one would break others."""
    with (
        tempfile.TemporaryDirectory(prefix="marketplace-outage-") as scratch,
        EmbeddedPostgres(Path(scratch) / "pgdata", delete_on_exit=True) as postgres,
    ):
        yield postgres, create_database(postgres.url, "marketplace_outage")


@dataclass(frozen=True)
class Served:
    channel: grpc.aio.Channel
    catalog: catalog_pb2_grpc.CatalogServiceStub
    orders: order_pb2_grpc.OrderServiceStub


@contextlib.asynccontextmanager
async def server_on(database_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    """The server as its own process on `database_url`, and stubs on a channel to it; it
    must be the same process at the end, and stop cleanly."""
    port = free_port()
    with (tmp_path / "server.log").open("wb") as log:
        server = start_server(server_env(database_url, port), log=log)
    try:
        wait_for_grpc(port, server)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(
                channel,
                catalog_pb2_grpc.CatalogServiceStub(channel),
                order_pb2_grpc.OrderServiceStub(channel),
            )
        assert server.poll() is None, "the same process must still be serving"
    finally:
        assert stop_process(server) == 0


async def health_is(channel: grpc.aio.Channel, status: int) -> bool:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return bool(reply.status == status)


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


async def test_server_survives_a_database_restart(
    own_postgres: tuple[EmbeddedPostgres, str], tmp_path: Path, tokens: Tokens
) -> None:
    postgres, database_url = own_postgres
    product_id = insert_product(database_url, stock=5)
    async with server_on(database_url, tmp_path) as served:
        channel, catalog, orders = served.channel, served.catalog, served.orders
        request = catalog_pb2.GetProductRequest(id=product_id)
        assert (await catalog.GetProduct(request, timeout=5)).product.stock == 5

        postgres.stop()

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await catalog.GetProduct(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        order = order_pb2.CreateOrderRequest(
            request_id="outage-1",
            items=[order_pb2.OrderItem(product_id=product_id, quantity=1)],
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await orders.CreateOrder(order, metadata=bearer(tokens.customer()), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        await eventually(lambda: health_is(channel, NOT_SERVING), within=20, what="down")
        postgres.start()
        await eventually(lambda: health_is(channel, SERVING), within=20, what="up again")
        placed = await orders.CreateOrder(order, metadata=bearer(tokens.customer()), timeout=10)
        assert placed.order.status == order_pb2.ORDER_STATUS_PENDING_PAYMENT
        assert (await catalog.GetProduct(request, timeout=5)).product.stock == 4


async def test_while_the_database_is_known_down_calls_fail_within_100_ms(
    own_postgres: tuple[EmbeddedPostgres, str], tmp_path: Path, tokens: Tokens
) -> None:
    """Once health says NOT_SERVING, every call that needs the database is UNAVAILABLE with
    RetryInfo at once (p99 under 100 ms over 200 calls, 50 at a time), instead of waiting
    out the pools' timeouts (5 s, and 10 s under load); the server serves again once the
    database is back. The one test that asserts a time bound: the issue asks for it."""
    postgres, database_url = own_postgres
    product_id = insert_product(database_url, stock=5)
    async with server_on(database_url, tmp_path) as served:
        channel, catalog, orders = served.channel, served.catalog, served.orders
        customer = bearer(tokens.customer(f"outage-{uuid.uuid4().hex[:8]}"))

        def order() -> order_pb2.CreateOrderRequest:
            line = order_pb2.OrderItem(product_id=product_id, quantity=1)
            return order_pb2.CreateOrderRequest(request_id=str(uuid.uuid4()), items=[line])

        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: orders.CreateOrder(order(), metadata=customer, timeout=10),
            lambda: catalog.GetProduct(catalog_pb2.GetProductRequest(id=product_id)),
            lambda: orders.ListOrders(order_pb2.ListOrdersRequest(), metadata=customer),
        ]

        async def timed(call: Callable[[], Awaitable[object]]) -> float:
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            elapsed = time.perf_counter() - started
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            status = status_of_rpc_error(refused.value)
            [info] = details_of(status, error_details_pb2.ErrorInfo)
            assert info.reason == "DATABASE_UNAVAILABLE"
            assert details_of(status, error_details_pb2.RetryInfo)
            return elapsed

        postgres.stop()
        await eventually(lambda: health_is(channel, NOT_SERVING), within=20, what="down")
        # One unmeasured round first: on a loaded machine the first burst also paid for
        # this client's own start (a fresh-clone CI run measured a p99 of 117 ms).
        await asyncio.gather(*(timed(calls[n % len(calls)]) for n in range(50)))
        rounds: list[list[float]] = []
        # The server's answer time, not this process's: late in a whole-suite run, a full
        # garbage collection of the test process's heap can stall every call in flight.
        gc.collect()
        gc.disable()
        try:
            for _ in range(4):
                rounds.append(
                    await asyncio.gather(*(timed(calls[n % len(calls)]) for n in range(50)))
                )
        finally:
            gc.enable()
        latencies = [latency for round_ in rounds for latency in round_]
        p99 = statistics.quantiles(latencies, n=100)[98]
        slowest = [f"{max(round_) * 1000:.0f}" for round_ in rounds]
        assert p99 < 0.1, f"p99 {p99 * 1000:.0f} ms; each round's slowest (ms): {slowest}"

        postgres.start()

        async def placing_again() -> bool:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await orders.CreateOrder(order(), metadata=customer, timeout=10)
                return True
            return False

        await eventually(placing_again, within=20, what="CreateOrder served again")
