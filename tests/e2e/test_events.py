"""Events through the real server (tests/stack.py: its own nats-server): every committed
order's event on the stream once though NATS is killed under load, and the dead-letter RPCs
over gRPC and REST, admin only, replaying a warehouse message once its cause is fixed."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable, Callable

import grpc
import httpx
import pytest

from marketplace.catalog.v1 import catalog_pb2
from marketplace.events.v1 import dead_letter_service_pb2 as dl
from marketplace.events.v1 import dead_letter_service_pb2_grpc as dl_grpc
from marketplace.events.v1 import events_pb2
from marketplace_client import MarketplaceClient
from tests.conftest import Tokens, eventually
from tests.integration.events import nats_client, stream_messages
from tests.stack import Stack, bearer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

STOCK_LEVELS_CONSUMER = "warehouse-stock-levels"


async def test_orders_placed_while_nats_is_killed_and_restarted_each_reach_the_stream_once(
    stack: Stack, channel: grpc.aio.Channel, tokens: Tokens
) -> None:
    """Customers keep ordering while NATS dies (SIGKILL) and comes back on its store: every
    order is placed, and each one's order.created event is on the stream exactly once."""
    assert stack.nats is not None
    async with MarketplaceClient(channel, token=tokens.admin()) as admin:
        product = await admin.create_product(
            sku=f"EVT-{uuid.uuid4().hex[:8]}",
            name="Event mug",
            price="3.00",
            currency="USD",
            stock=10_000,
        )
    placed: list[str] = []

    async def customer(n: int) -> None:
        async with MarketplaceClient(channel, token=tokens.customer(f"evt-{n}")) as client:
            for _ in range(15):
                order = await client.create_order([(product.id, 1)])
                placed.append(order.id)
                await asyncio.sleep(0.02)

    customers = [asyncio.create_task(customer(n)) for n in range(8)]
    await eventually(_at_least(placed, 20), within=30, what="the first orders")
    stack.nats.kill()
    await eventually(_at_least(placed, 60), within=30, what="orders placed while NATS is down")
    stack.nats.start()
    await asyncio.gather(*customers)
    assert len(placed) == 120

    nats_url = stack.nats.url

    async def created_events() -> list[str] | None:
        created = [
            events_pb2.OrderCreated.FromString(message.data).order_id
            for message in await stream_messages(nats_url)
            if message.subject == "marketplace.order.created"
        ]
        return created if set(placed) <= set(created) else None

    created = await eventually(created_events, within=60, what="every order's event")
    mine = [order_id for order_id in created if order_id in set(placed)]
    assert sorted(mine) == sorted(placed), "each order's event exactly once"


def _at_least(items: list[str], count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(items) >= count

    return check


async def test_dead_letters_are_admin_only_over_grpc_and_rest(
    stack: Stack, channel: grpc.aio.Channel, rest: httpx.AsyncClient, tokens: Tokens
) -> None:
    stub = dl_grpc.DeadLetterServiceStub(channel)
    for metadata, code in (
        (bearer(tokens.customer()), grpc.StatusCode.PERMISSION_DENIED),
        ((), grpc.StatusCode.UNAUTHENTICATED),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as listing:
            await stub.ListDeadLetters(dl.ListDeadLettersRequest(), metadata=metadata)
        assert listing.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as replay:
            await stub.ReplayDeadLetter(
                dl.ReplayDeadLetterRequest(id="1", request_id="r-1"), metadata=metadata
            )
        assert replay.value.code() == code
    customer = {"authorization": f"Bearer {tokens.customer()}"}
    assert (await rest.get("/v1/deadLetters", headers=customer)).status_code == 403
    refused = await rest.post(
        "/v1/deadLetters/1:replay", json={"requestId": "r-1"}, headers=customer
    )
    assert refused.status_code == 403
    assert (await rest.get("/v1/deadLetters")).status_code == 401


async def test_a_warehouse_level_for_an_unknown_sku_is_dead_lettered_and_replayed_once_fixed(
    stack: Stack, channel: grpc.aio.Channel, rest: httpx.AsyncClient, tokens: Tokens
) -> None:
    """An unknown SKU is a permanent problem: dead-lettered at the first attempt. Once the
    product exists, the admin's replay (REST) applies the level, once."""
    assert stack.nats is not None
    sku = f"WH-{uuid.uuid4().hex[:8]}"
    level = {"sku": sku, "warehouse": "main", "onHand": 7, "version": 1}
    async with nats_client(stack.nats.url) as nats:
        await nats.jetstream().publish("warehouse.stock_levels", json.dumps(level).encode())
    admin = {"authorization": f"Bearer {tokens.admin()}"}

    async def dead_letter() -> dict[str, object] | None:
        listed = await rest.get(
            "/v1/deadLetters",
            params={"consumer": STOCK_LEVELS_CONSUMER, "pageSize": 1000},
            headers=admin,
        )
        assert listed.status_code == 200, listed.text
        for letter in listed.json()["deadLetters"]:
            if sku in letter["error"] or json.loads(_data(letter)).get("sku") == sku:
                return dict(letter)
        return None

    letter = await eventually(dead_letter, within=30, what="the level's dead letter")
    assert letter["attempts"] == 1
    assert letter["originalSubject"] == "warehouse.stock_levels"
    assert letter["originalStream"] == "WAREHOUSE"
    assert letter["consumer"] == STOCK_LEVELS_CONSUMER

    replay = {"requestId": str(uuid.uuid4())}
    path = f"/v1/deadLetters/{letter['id']}:replay"
    still = await rest.post(path, json=replay, headers=admin)
    assert still.status_code == 400, still.text  # FAILED_PRECONDITION: the SKU is unknown
    assert still.json()["details"][0]["reason"] == "DEAD_LETTER_STILL_FAILS"

    async with MarketplaceClient(channel, token=tokens.admin()) as client:
        product = await client.create_product(
            sku=sku,
            name="Warehouse mug",
            price="5.00",
            currency="USD",
            inventory_source=catalog_pb2.INVENTORY_SOURCE_WAREHOUSE,
        )
        assert product.stock == 0
        replayed = await rest.post(path, json=replay, headers=admin)
        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["deadLetter"]["id"] == letter["id"]
        assert (await client.get_product(product.id)).stock == 7
        # The same request again answers the same; a new one finds the letter gone.
        again = await rest.post(path, json=replay, headers=admin)
        assert again.json() == replayed.json()
        gone = await rest.post(path, json={"requestId": str(uuid.uuid4())}, headers=admin)
        assert gone.status_code == 404
        assert await dead_letter() is None
        assert (await client.get_product(product.id)).stock == 7


def _data(letter: dict[str, object]) -> bytes:
    return base64.b64decode(str(letter["data"]))
