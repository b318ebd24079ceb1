"""Flash-sale behaviour through the real server: no oversell, no deadlock, one order per
request_id, whatever the concurrency."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter

import grpc
import psycopg
import pytest

from marketplace.order.v1 import order_pb2, order_pb2_grpc
from tests.conftest import Tokens, insert_product, stock_of
from tests.stack import Stack, bearer

pytestmark = pytest.mark.e2e

CLIENTS = 64


def sold_units(database_url: str, product_id: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(l.quantity), 0) FROM order_lines l JOIN orders o"
            " ON o.id = l.order_id WHERE l.product_id = %s AND o.status = 'PENDING_PAYMENT'",
            (product_id,),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def _attempt_orders(
    stack: Stack,
    token: str,
    attempts: itertools.count[int],
    limit: int,
    lines_for: object,
) -> Counter[str]:
    """One client with its own connection, placing orders until `limit` attempts are made."""
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = order_pb2_grpc.OrderServiceStub(channel)
        while (n := next(attempts)) < limit:
            items = lines_for(n)  # type: ignore[operator]
            request = order_pb2.CreateOrderRequest(request_id=str(uuid.uuid4()), items=items)
            try:
                await stub.CreateOrder(request, metadata=bearer(token), timeout=60)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
    return codes


async def test_flash_sale_sells_exactly_the_stock(stack: Stack, tokens: Tokens) -> None:
    initial = 100
    product_id = insert_product(stack.database_url, stock=initial)
    attempts = itertools.count()

    def one_unit(_: int) -> list[order_pb2.OrderItem]:
        return [order_pb2.OrderItem(product_id=product_id, quantity=1)]

    results = await asyncio.gather(
        *(
            _attempt_orders(stack, tokens.customer(f"buyer-{i}"), attempts, 400, one_unit)
            for i in range(CLIENTS)
        )
    )
    codes = sum(results, Counter())
    assert codes == Counter({"OK": 100, "FAILED_PRECONDITION": 300})
    assert stock_of(stack.database_url, product_id) == 0
    assert sold_units(stack.database_url, product_id) + 0 == initial


async def test_multi_unit_orders_never_oversell(stack: Stack, tokens: Tokens) -> None:
    initial = 250
    product_id = insert_product(stack.database_url, stock=initial)
    attempts = itertools.count()

    def varying(n: int) -> list[order_pb2.OrderItem]:
        return [order_pb2.OrderItem(product_id=product_id, quantity=1 + n % 7)]

    results = await asyncio.gather(
        *(
            _attempt_orders(stack, tokens.customer(f"multi-{i}"), attempts, 400, varying)
            for i in range(CLIENTS)
        )
    )
    codes = sum(results, Counter())
    assert set(codes) <= {"OK", "FAILED_PRECONDITION"}
    left = stock_of(stack.database_url, product_id)
    assert left >= 0
    assert sold_units(stack.database_url, product_id) + left == initial
    # Every refusal happened because the stock could not cover it: at most 6 units remain.
    assert left < 7


async def test_hot_products_in_opposite_line_order_never_deadlock(
    stack: Stack, tokens: Tokens
) -> None:
    initial = 100_000
    first = insert_product(stack.database_url, stock=initial)
    second = insert_product(stack.database_url, stock=initial)
    attempts = itertools.count()

    def crossing(n: int) -> list[order_pb2.OrderItem]:
        pair = [first, second] if n % 2 else [second, first]
        return [order_pb2.OrderItem(product_id=p, quantity=1) for p in pair]

    results = await asyncio.gather(
        *(
            _attempt_orders(stack, tokens.customer(f"cross-{i}"), attempts, 600, crossing)
            for i in range(CLIENTS)
        )
    )
    codes = sum(results, Counter())
    assert codes == Counter({"OK": 600})
    for product_id in (first, second):
        assert stock_of(stack.database_url, product_id) == initial - 600


async def test_one_request_id_sent_twenty_times_concurrently_orders_once(
    stack: Stack, tokens: Tokens
) -> None:
    product_id = insert_product(stack.database_url, stock=50)
    request = order_pb2.CreateOrderRequest(
        request_id=str(uuid.uuid4()),
        items=[order_pb2.OrderItem(product_id=product_id, quantity=3)],
    )
    customer = f"retrier-{uuid.uuid4().hex[:8]}"
    token = tokens.customer(customer)

    async def send() -> order_pb2.CreateOrderResponse:
        async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
            stub = order_pb2_grpc.OrderServiceStub(channel)
            response: order_pb2.CreateOrderResponse = await stub.CreateOrder(
                request, metadata=bearer(token), timeout=60
            )
            return response

    responses = await asyncio.gather(*(send() for _ in range(20)))
    assert len({r.order.id for r in responses}) == 1
    assert all(r.order.items[0].quantity == 3 for r in responses)
    assert stock_of(stack.database_url, product_id) == 47
    with psycopg.connect(stack.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM orders WHERE customer_id = %s AND request_id = %s",
            (customer, request.request_id),
        ).fetchone()
    assert row is not None
    assert row[0] == 1
