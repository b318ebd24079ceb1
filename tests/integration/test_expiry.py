"""Expiry of unpaid orders on a real PostgreSQL, with several sweepers at once.

No provider call happens on these paths, so the provider points nowhere.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from server.db.driver import DriverPool
from server.domain.errors import FailedPrecondition
from server.domain.identity import Principal, Role
from server.domain.orders import OrderStatus, cancel_request, order_request
from server.services.upkeep import Upkeep
from server.services.use_cases import UseCases
from tests.conftest import insert_product, sqlalchemy_engine, stock_of
from tests.use_cases import wired

pytestmark = pytest.mark.integration


@pytest.fixture
async def sweepers(database_url: str, hot_path: DriverPool) -> AsyncIterator[list[Upkeep]]:
    """Two sweepers with their own connection pools, as two server processes have (they
    never place orders, so they share the hot-path pool)."""
    engines = [sqlalchemy_engine(database_url, pool_size=4) for _ in range(2)]
    yield [wired(engine, hot_path).upkeep for engine in engines]
    for engine in engines:
        await engine.dispose()


def _status_of(database_url: str, order_ids: list[str]) -> dict[str, str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT id::text, status FROM orders WHERE id = ANY(%s::uuid[])", (order_ids,)
        ).fetchall()
    return dict(rows)


async def test_two_sweepers_expire_each_order_once_and_release_stock_once(
    engine: AsyncEngine, hot_path: DriverPool, database_url: str, sweepers: list[Upkeep]
) -> None:
    hot = insert_product(database_url, stock=100)
    other = insert_product(database_url, stock=100)
    quick = wired(engine, hot_path, payment_window_seconds=0.05)
    placed = [
        await quick.placement.place_order(
            f"cust-{n}", order_request(f"exp-{n}", [(hot, 2), (other, 1)] if n % 2 else [(hot, 3)])
        )
        for n in range(30)
    ]
    taken_hot = sum(2 if n % 2 else 3 for n in range(30))
    assert stock_of(database_url, hot) == 100 - taken_hot
    await asyncio.sleep(0.1)

    async def sweep(upkeep: Upkeep) -> int:
        total = 0
        while count := await upkeep.expire_orders():
            total += count
        return total

    counts = await asyncio.gather(*(sweep(s) for s in sweepers))
    ids = [order.id for order in placed]
    assert sum(counts) == 30  # every order expired by exactly one sweeper
    assert set(_status_of(database_url, ids).values()) == {OrderStatus.EXPIRED.value}
    assert stock_of(database_url, hot) == 100
    assert stock_of(database_url, other) == 100
    assert [await s.expire_orders() for s in sweepers] == [0, 0]


async def test_orders_inside_their_window_are_left_alone(
    use_cases: UseCases, database_url: str, sweepers: list[Upkeep]
) -> None:
    product = insert_product(database_url, stock=5)
    order = await use_cases.placement.place_order(
        "cust-window", order_request("w-1", [(product, 1)])
    )
    await sweepers[0].expire_orders()
    assert _status_of(database_url, [order.id]) == {order.id: "PENDING_PAYMENT"}
    assert stock_of(database_url, product) == 4


def _insert_pending_payment(database_url: str, order_id: str, customer_id: str) -> str:
    payment_id = str(uuid.uuid4())
    with psycopg.connect(database_url) as conn:
        conn.execute(
            """
            INSERT INTO payments (id, order_id, customer_id, request_id, request_fingerprint,
                                  status, currency, amount, provider, payment_method,
                                  provider_reference, next_check_time)
            VALUES (%s, %s, %s, %s, %s, 'PENDING', 'USD', 10, 'stripe', 'pm_x', %s,
                    now() + interval '1 hour')
            """,
            (payment_id, order_id, customer_id, f"pay-{payment_id}", "f" * 64, f"pi_{payment_id}"),
        )
    return payment_id


async def test_an_order_with_a_payment_in_flight_neither_expires_nor_cancels(
    engine: AsyncEngine, hot_path: DriverPool, database_url: str, sweepers: list[Upkeep]
) -> None:
    product = insert_product(database_url, stock=5)
    quick = wired(engine, hot_path, payment_window_seconds=0.05)
    order = await quick.placement.place_order("cust-flight", order_request("f-1", [(product, 2)]))
    payment_id = _insert_pending_payment(database_url, order.id, "cust-flight")
    await asyncio.sleep(0.1)
    assert await sweepers[0].expire_orders() == 0
    owner = Principal("cust-flight", frozenset({Role.CUSTOMER}))
    with pytest.raises(FailedPrecondition) as refused:
        await quick.cancellation.cancel_order(owner, cancel_request(order.id, ""))
    assert refused.value.reason == "PAYMENT_IN_PROGRESS"
    assert refused.value.metadata["paymentId"] == payment_id
    assert _status_of(database_url, [order.id]) == {order.id: "PENDING_PAYMENT"}
    assert stock_of(database_url, product) == 3
