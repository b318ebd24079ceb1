"""Long-lived streams cannot starve unary calls: health Watch (and reflection) streams are
bounded per peer and per server process, apart from the calls' budget
(MAX_CONCURRENT_RPCS), directly and through Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.envoy import EdgeLimits, envoy_in_front_of
from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from tests.conftest import Tokens, insert_product
from tests.e2e.statuses import details_of, status_of_rpc_error
from tests.stack import Stack, bearer, server_env

pytestmark = pytest.mark.e2e

STREAMS = 2_400
# Opened 200 at a time: 2,400 started at one instant also end with some CANCELLED by grpc
# itself, even on a server with nothing but grpcio-health-checking's servicer.
BURST = 200


async def _watch(stub: health_pb2_grpc.HealthStub, opened: list[object]) -> grpc.StatusCode:
    """One Watch stream: OK once its first status arrived (it then stays open, in `opened`),
    or the code it was refused with."""
    call = stub.Watch(health_pb2.HealthCheckRequest())
    try:
        await call.read()
    except grpc.aio.AioRpcError as refused:
        if refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(opened) % 7 == 0:
            _check_refusal(refused)
        return refused.code()
    opened.append(call)
    return grpc.StatusCode.OK


def _check_refusal(refused: grpc.aio.AioRpcError) -> None:
    status = status_of_rpc_error(refused)
    reasons = {info.reason for info in details_of(status, error_details_pb2.ErrorInfo)}
    # The server's TOO_MANY_STREAMS, or Envoy's RATE_LIMITED for one client's flood.
    assert reasons <= {"TOO_MANY_STREAMS", "RATE_LIMITED"}, status
    assert reasons, status
    assert details_of(status, error_details_pb2.RetryInfo), status


@contextlib.asynccontextmanager
async def _flood(
    target: str, connections: int = 1
) -> AsyncIterator[tuple[list[object], list[grpc.StatusCode]]]:
    """2,400 Watch streams at `target`, kept open for the block. One connection reaches one
    server process (SO_REUSEPORT shares out connections, not calls)."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(connections)]
    opened: list[object] = []
    codes: list[grpc.StatusCode] = []
    try:
        stubs = [health_pb2_grpc.HealthStub(channel) for channel in channels]
        for start in range(0, STREAMS, BURST):
            codes += await asyncio.gather(
                *(_watch(stubs[n % connections], opened) for n in range(start, start + BURST))
            )
        yield opened, codes
    finally:
        for channel in channels:
            await channel.close()


async def _orders_and_reads_succeed(
    orders: order_pb2_grpc.OrderServiceStub,
    catalog: catalog_pb2_grpc.CatalogServiceStub,
    product_id: str,
    token: str,
) -> None:
    def order() -> order_pb2.CreateOrderRequest:
        line = order_pb2.OrderItem(product_id=product_id, quantity=1)
        return order_pb2.CreateOrderRequest(request_id=str(uuid.uuid4()), items=[line])

    await asyncio.gather(
        *(orders.CreateOrder(order(), metadata=bearer(token), timeout=30) for _ in range(20)),
        *(
            catalog.GetProduct(catalog_pb2.GetProductRequest(id=product_id), timeout=30)
            for _ in range(20)
        ),
    )


async def test_a_peers_streams_are_bounded_and_calls_go_on(
    stack: Stack,
    tokens: Tokens,
    catalog_stub: catalog_pb2_grpc.CatalogServiceStub,
    order_stub: order_pb2_grpc.OrderServiceStub,
) -> None:
    """One peer asks for 2,400: it gets its 10 (MAX_STREAMS_PER_PEER), the rest are refused
    at once, and orders and reads succeed while they are open."""
    product_id = insert_product(stack.database_url, stock=1_000)
    token = tokens.customer(f"streams-{uuid.uuid4().hex[:8]}")
    async with _flood(stack.grpc_target) as (opened, codes):
        assert len(opened) == 10
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        # A second flood while the first one's streams stay open, and calls meanwhile.

        async def another_flood() -> None:
            async with _flood(stack.grpc_target) as (more, _):
                assert not more

        await asyncio.gather(
            another_flood(), _orders_and_reads_succeed(order_stub, catalog_stub, product_id, token)
        )
        await _orders_and_reads_succeed(order_stub, catalog_stub, product_id, token)


async def test_a_process_streams_are_bounded_whoever_asks(
    stack: Stack, tmp_path: Path, tokens: Tokens
) -> None:
    """A server allowing 1,000 streams per peer but 50 in all, asked for 2,400."""
    port = free_port()
    env = {
        **server_env(stack.database_url, port),
        "MAX_CONCURRENT_STREAMS": "50",
        "MAX_STREAMS_PER_PEER": "1000",
        "SERVER_WORKERS": "1",
    }
    with (tmp_path / "server.log").open("wb") as log:
        server = start_server(env, log=log)
    try:
        wait_for_grpc(port, server)
        product_id = insert_product(stack.database_url, stock=1_000)
        token = tokens.customer(f"streams-{uuid.uuid4().hex[:8]}")
        target = f"127.0.0.1:{port}"
        async with (
            _flood(target, connections=4) as (opened, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            assert len(opened) == 50
            await _orders_and_reads_succeed(
                order_pb2_grpc.OrderServiceStub(channel),
                catalog_pb2_grpc.CatalogServiceStub(channel),
                product_id,
                token,
            )
    finally:
        assert stop_process(server) == 0


async def test_streams_through_envoy_do_not_starve_rest_calls(
    stack: Stack, tmp_path: Path, tokens: Tokens
) -> None:
    """Envoy with its default limits: one client's 2,400 Watch streams are refused at the
    edge past its rate, and at the server past Envoy's share as a peer; REST orders and
    reads from another client go on."""
    product_id = insert_product(stack.database_url, stock=1_000)
    headers = {"authorization": f"Bearer {tokens.customer(f'streams-{uuid.uuid4().hex[:8]}')}"}
    with envoy_in_front_of(stack.grpc_port, tmp_path, limits=EdgeLimits()) as envoy:
        base = f"http://127.0.0.1:{envoy.http_port}"
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with (
            _flood(f"127.0.0.1:{envoy.http_port}", connections=4) as (opened, codes),
            httpx.AsyncClient(base_url=base, transport=transport, timeout=30) as rest,
        ):
            # Envoy is one peer to each server process it reaches.
            assert 1 <= len(opened) <= 10 * (os.cpu_count() or 1)
            assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
            order = {"requestId": str(uuid.uuid4()), "items": [{"productId": product_id}]}
            order["items"][0]["quantity"] = 1
            placed = await rest.post("/v1/orders", json=order, headers=headers)
            assert placed.status_code == 200, placed.text[:300]
            for _ in range(5):
                read = await rest.get(f"/v1/products/{product_id}")
                assert read.status_code == 200, read.text[:300]
