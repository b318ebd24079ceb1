"""PostgreSQL goes away mid-flight: calls get UNAVAILABLE, health says NOT_SERVING, and the
same server process serves again once the database is back, without a restart."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.postgres import EmbeddedPostgres, create_database
from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from tests.conftest import Tokens, eventually, insert_product
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


async def test_server_survives_a_database_restart(
    own_postgres: tuple[EmbeddedPostgres, str], tmp_path: Path, tokens: Tokens
) -> None:
    postgres, database_url = own_postgres
    product_id = insert_product(database_url, stock=5)
    port = free_port()
    with (tmp_path / "server.log").open("wb") as log:
        server = start_server(server_env(database_url, port), log=log)
    try:
        wait_for_grpc(port, server)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            orders = order_pb2_grpc.OrderServiceStub(channel)
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

            async def not_serving() -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                return bool(reply.status == health_pb2.HealthCheckResponse.NOT_SERVING)

            await eventually(not_serving, within=20, what="NOT_SERVING")

            postgres.start()

            async def serving_again() -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            await eventually(serving_again, within=20, what="SERVING again")
            placed = await orders.CreateOrder(order, metadata=bearer(tokens.customer()), timeout=10)
            assert placed.order.status == order_pb2.ORDER_STATUS_PENDING_PAYMENT
            assert (await catalog.GetProduct(request, timeout=5)).product.stock == 4
        assert server.poll() is None, "the same process must still be serving"
    finally:
        assert stop_process(server) == 0
