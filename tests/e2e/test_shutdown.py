"""SIGTERM lets in-flight calls finish within the grace period, then exits 0."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import grpc
import psycopg
import pytest

from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from tests.conftest import Tokens, insert_product, stock_of
from tests.stack import bearer, server_env

pytestmark = pytest.mark.e2e


async def test_sigterm_drains_an_in_flight_order(
    database_url: str, tokens: Tokens, tmp_path: Path
) -> None:
    product_id = insert_product(database_url, stock=3)
    port = free_port()
    with (tmp_path / "server.log").open("wb") as log:
        server = start_server(server_env(database_url, port), log=log)
    try:
        wait_for_grpc(port, server)
        # Hold the product's row lock so the order is provably still running at SIGTERM.
        blocker = psycopg.connect(database_url)
        blocker.execute("SELECT stock FROM products WHERE id = %s FOR UPDATE", (product_id,))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = order_pb2_grpc.OrderServiceStub(channel)
            request = order_pb2.CreateOrderRequest(
                request_id=str(uuid.uuid4()),
                items=[order_pb2.OrderItem(product_id=product_id, quantity=1)],
            )
            in_flight = asyncio.ensure_future(
                stub.CreateOrder(request, metadata=bearer(tokens.customer()), timeout=30)
            )
            await asyncio.sleep(0.5)
            assert not in_flight.done()
            server.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert server.poll() is None, "the server must wait for the in-flight call"
            blocker.commit()
            blocker.close()
            response = await in_flight
        assert response.order.status == order_pb2.ORDER_STATUS_PENDING_PAYMENT
        assert server.wait(timeout=15) == 0
        assert stock_of(database_url, product_id) == 2
    finally:
        stop_process(server)
