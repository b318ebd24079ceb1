"""The warehouse end to end (tests/stack.py: the server, its own nats-server, localstripe):
the stand-in warehouse ships a paid order and its level comes back, and levels and
shipments published shuffled and repeated on NATS end where the rule says."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from devstack.localstripe import SUCCESS_CARD
from devstack.processes import stop_process
from devstack.warehouse import WarehouseState, publish_stock_level, start_warehouse
from marketplace.catalog.v1 import catalog_pb2
from marketplace.order.v1 import order_pb2
from marketplace_client import MarketplaceClient
from tests.conftest import Tokens, eventually, stock_of
from tests.integration.events import nats_client
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture
def stand_in(stack: Stack, tmp_path: Path) -> Iterator[Path]:
    """The stand-in warehouse as make run starts it, shipping half a second after a paid
    order; its state file."""
    assert stack.nats is not None
    state = tmp_path / "warehouse.json"
    with (tmp_path / "warehouse.log").open("ab") as log:
        process = start_warehouse(stack.nats.url, state, ship_delay=0.5, log=log)
    try:
        yield state
    finally:
        stop_process(process)


def _status_of(database_url: str, order_id: str) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT status FROM orders WHERE id = %s", (order_id,)).fetchone()
    assert row is not None
    return str(row[0])


async def test_the_stand_in_ships_a_paid_order_and_its_level_comes_back(
    stack: Stack, channel: grpc.aio.Channel, tokens: Tokens, stand_in: Path
) -> None:
    assert stack.nats is not None
    sku = f"WH-{uuid.uuid4().hex[:8]}"
    async with MarketplaceClient(channel, token=tokens.admin()) as admin:
        product = await admin.create_product(
            sku=sku,
            name="Shipped by the stand-in",
            price="12.50",
            currency="USD",
            inventory_source=catalog_pb2.INVENTORY_SOURCE_WAREHOUSE,
        )
    # A stocktake pushed by hand: the catalog follows, and so does the stand-in's own count.
    await publish_stock_level(stack.nats.url, sku, 10, "main")

    async def stock_is(expected: int) -> bool:
        return stock_of(stack.database_url, product.id) == expected

    await eventually(lambda: stock_is(10), within=30, what="the level applied")
    async with MarketplaceClient(channel, token=tokens.customer()) as customer:
        order = await customer.create_order([(product.id, 3)])
        assert stock_of(stack.database_url, product.id) == 7
        card = await stack.localstripe.payment_method(SUCCESS_CARD)
        await customer.create_payment(order.id, card)

        async def shipped() -> bool:
            return (await customer.get_order(order.id)).status == order_pb2.ORDER_STATUS_SHIPPED

        await eventually(shipped, within=60, what="the order SHIPPED")
    await eventually(lambda: stock_is(7), within=30, what="the stand-in's level applied")
    kept = WarehouseState.load(stand_in)
    assert kept.levels[sku]["main"][0] == 7
    assert order.id in kept.shipped


async def test_levels_and_shipments_shuffled_and_repeated_on_nats(
    stack: Stack, channel: grpc.aio.Channel, tokens: Tokens
) -> None:
    """Three paid orders shipped by a warehouse we play by hand: every level and shipment
    published in a shuffled order, a third of them twice (under fresh message ids, so
    JetStream's de-duplication does not hide them: the consumers' inbox must), and the
    stock never shows more than the warehouse has free; in the end, on-hand minus unshipped
    units."""
    assert stack.nats is not None
    rng = random.Random(1515)
    sku = f"WH-{uuid.uuid4().hex[:8]}"
    async with MarketplaceClient(channel, token=tokens.admin()) as admin:
        product = await admin.create_product(
            sku=sku,
            name="Shuffled",
            price="3",
            currency="USD",
            inventory_source=catalog_pb2.INVENTORY_SOURCE_WAREHOUSE,
        )
    first = await publish_stock_level(stack.nats.url, sku, 30, "main")

    async def stock_is(expected: int) -> bool:
        return stock_of(stack.database_url, product.id) == expected

    await eventually(lambda: stock_is(30), within=30, what="the first level")
    async with MarketplaceClient(channel, token=tokens.customer()) as customer:
        orders = [(await customer.create_order([(product.id, n)])).id for n in (2, 3, 4)]
        pending = (await customer.create_order([(product.id, 5)])).id  # never paid
    with psycopg.connect(stack.database_url) as conn:
        # Paid without a payment: no fulfilment request, so only this test ships them.
        conn.execute("UPDATE orders SET status = 'PAID' WHERE id = ANY(%s::uuid[])", (orders,))
    on_hand, version, messages = 30, int(json.loads(first.body)["version"]), []
    for order_id, quantity in zip(orders, (2, 3, 4), strict=True):
        on_hand, version = on_hand - quantity, version + 1
        messages.append(
            (
                "warehouse.stock_levels",
                {"sku": sku, "warehouse": "main", "onHand": on_hand, "version": version},
            )
        )
        messages.append(
            (
                "warehouse.shipments",
                {
                    "shipmentId": f"S-{order_id}",
                    "orderId": order_id,
                    "warehouse": "main",
                    "lines": [{"sku": sku, "quantity": quantity, "levelVersion": version}],
                },
            )
        )
    # then a delivery: 31 on hand, 5 units still to ship (the pending order)
    messages.append(
        (
            "warehouse.stock_levels",
            {"sku": sku, "warehouse": "main", "onHand": on_hand + 10, "version": version + 1},
        )
    )
    messages += rng.sample(messages, len(messages) // 3)
    rng.shuffle(messages)
    async with nats_client(stack.nats.url) as client:
        jetstream = client.jetstream()
        for subject, body in messages:
            await jetstream.publish(
                subject, json.dumps(body).encode(), headers={"Nats-Msg-Id": str(uuid.uuid4())}
            )
            # everything has happened at the warehouse: 31 on hand, 5 of them sold
            assert stock_of(stack.database_url, product.id) <= 26
    await eventually(lambda: stock_is(26), within=60, what="on-hand minus unshipped")
    for order_id in orders:
        assert _status_of(stack.database_url, order_id) == "SHIPPED"
    assert _status_of(stack.database_url, pending) == "PENDING_PAYMENT"
