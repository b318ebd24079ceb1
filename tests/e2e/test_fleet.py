"""Three replicas behind Envoy under a steady order and payment load (REST and gRPC, every
write with a request id): one is killed (SIGKILL), one stopped (SIGTERM), a new one started.
Nothing acknowledged is lost or applied twice, stock and money still balance, the only
calls that failed were in flight on the killed replica, and each of those, sent again with
its request id, gets the one answer."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from devstack.localstripe import SUCCESS_CARD
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from marketplace.payment.v1 import payment_pb2, payment_pb2_grpc
from tests.conftest import Tokens, eventually
from tests.e2e.payment_checks import Ledger, no_provider_work_left, query
from tests.stack import FleetStack, bearer, running_fleet

pytestmark = pytest.mark.e2e

CLIENTS_PER_FACE = 3
# Acknowledged orders between the steps: enough load around each event to matter.
ORDERS_PER_STEP = 15
CALL_TIMEOUT = 30


@pytest.fixture
def fleet(database_url: str) -> Iterator[FleetStack]:
    with running_fleet(database_url, replicas=3, spares=1) as running:
        yield running


@dataclass
class Call:
    """One write as a client saw it."""

    face: str  # "grpc" or "rest"
    kind: str  # "order" or "payment"
    token: str
    request_id: str
    body: dict[str, Any]
    started: float
    ended: float = 0.0
    answer_id: str | None = None  # the order's or payment's id, once acknowledged
    error: str | None = None
    envoy_request_id: str | None = None


@dataclass
class Load:
    """Clients ordering then paying through Envoy until told to stop."""

    fleet: FleetStack
    products: tuple[str, str]
    calls: list[Call] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def acknowledged(self, kind: str) -> list[Call]:
        return [call for call in self.calls if call.kind == kind and call.answer_id]

    async def client(self, face: str, token: str) -> None:
        target = self.fleet.envoy_grpc_target
        async with (
            grpc.aio.insecure_channel(target) as channel,
            httpx.AsyncClient(base_url=self.fleet.stack.rest_base, timeout=CALL_TIMEOUT) as rest,
        ):
            n = 0
            while not self.stopping.is_set():
                n += 1
                items = [{"productId": self.products[0], "quantity": 1 + n % 3}]
                if n % 2:
                    items.append({"productId": self.products[1], "quantity": 1})
                order = await self.send(face, "order", token, {"items": items}, channel, rest)
                if order.answer_id is None:
                    continue
                payment_method = await self.fleet.stack.localstripe.payment_method(SUCCESS_CARD)
                await self.send(
                    face,
                    "payment",
                    token,
                    {"orderId": order.answer_id, "paymentMethod": payment_method},
                    channel,
                    rest,
                )

    async def send(
        self,
        face: str,
        kind: str,
        token: str,
        body: dict[str, Any],
        channel: grpc.aio.Channel,
        rest: httpx.AsyncClient,
        request_id: str | None = None,
    ) -> Call:
        call = Call(face, kind, token, request_id or str(uuid.uuid4()), body, time.monotonic())
        self.calls.append(call)
        if face == "rest":
            await _send_rest(call, rest)
        else:
            await _send_grpc(call, channel)
        call.ended = time.monotonic()
        return call


async def _send_rest(call: Call, rest: httpx.AsyncClient) -> None:
    body = {**call.body, "requestId": call.request_id}
    path = "/v1/orders"
    if call.kind == "payment":
        path = f"/v1/orders/{body.pop('orderId')}/payments"
    try:
        reply = await rest.post(path, json=body, headers={"authorization": f"Bearer {call.token}"})
    except httpx.TransportError as error:
        call.error = repr(error)
        return
    call.envoy_request_id = reply.headers.get("x-request-id")
    if reply.status_code == 200:
        call.answer_id = reply.json()[call.kind]["id"]
    else:
        call.error = f"HTTP {reply.status_code} {reply.text[:200]}"


async def _send_grpc(call: Call, channel: grpc.aio.Channel) -> None:
    metadata = bearer(call.token)
    rpc: Any
    if call.kind == "order":
        rpc = order_pb2_grpc.OrderServiceStub(channel).CreateOrder(
            order_pb2.CreateOrderRequest(
                request_id=call.request_id,
                items=[
                    order_pb2.OrderItem(product_id=item["productId"], quantity=item["quantity"])
                    for item in call.body["items"]
                ],
            ),
            metadata=metadata,
            timeout=CALL_TIMEOUT,
        )
    else:
        rpc = payment_pb2_grpc.PaymentServiceStub(channel).CreatePayment(
            payment_pb2.CreatePaymentRequest(
                order_id=call.body["orderId"],
                request_id=call.request_id,
                payment_method=call.body["paymentMethod"],
            ),
            metadata=metadata,
            timeout=CALL_TIMEOUT,
        )
    try:
        reply = await rpc
        call.answer_id = reply.order.id if call.kind == "order" else reply.payment.id
    except grpc.aio.AioRpcError as error:
        call.error = f"{error.code().name} {error.details()}"
        headers = dict(error.initial_metadata() or ()) | dict(error.trailing_metadata() or ())
        call.envoy_request_id = str(headers.get("x-request-id", "")) or None
        return
    call.envoy_request_id = str(dict(await rpc.initial_metadata()).get("x-request-id", ""))


def _upstreams(envoy_log: str) -> dict[str, str]:
    """The upstream each request id's last attempt went to, from Envoy's access log (its
    default format ends with "<x-request-id>" "<authority>" "<upstream host>")."""
    found = re.findall(r'"([0-9a-f-]{36})" "[^"]*" "([^"]*)"\s*$', envoy_log, re.MULTILINE)
    return dict(found)


async def test_killing_stopping_and_adding_replicas_loses_nothing(
    fleet: FleetStack, tokens: Tokens
) -> None:
    stack = fleet.stack
    ledger = Ledger(stack)
    products = (ledger.product(stock=100_000, price="7.50"), ledger.product(stock=100_000))
    load = Load(fleet, products)
    run = uuid.uuid4().hex[:8]
    clients = [
        asyncio.create_task(load.client(face, tokens.customer(f"fleet-{run}-{face}-{i}")))
        for face in ("grpc", "rest")
        for i in range(CLIENTS_PER_FACE)
    ]

    async def orders_reach(count: int) -> bool:
        return len(load.acknowledged("order")) >= count

    try:
        await eventually(
            lambda: orders_reach(ORDERS_PER_STEP), within=60, what="orders before the kill"
        )
        killed, stopped = fleet.fleet.replicas[0], fleet.fleet.replicas[1]
        fleet.fleet.kill(killed)
        killed_at = time.monotonic()
        await eventually(
            lambda: orders_reach(2 * ORDERS_PER_STEP), within=60, what="orders after the kill"
        )
        # The killed one's replacement, then a replica stopped as in a rolling update: more
        # than half the fleet out at once would put Envoy in panic mode (envoy.yaml).
        new = await asyncio.to_thread(fleet.start_spare)
        new_at = time.monotonic()

        async def new_replica_serves() -> bool:
            stats = (await fleet.upstream_stats())[new.grpc_port]
            return int(stats["rq_success"]) > 0

        await eventually(new_replica_serves, within=60, what="the new replica taking calls")
        recovered_at = time.monotonic()
        stopped.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(stopped.process.wait, 30) == 0
        target = len(load.acknowledged("order")) + ORDERS_PER_STEP
        await eventually(lambda: orders_reach(target), within=60, what="orders after the stop")
    finally:
        load.stopping.set()
        await asyncio.gather(*clients)

    failed = [call for call in load.calls if call.answer_id is None]
    envoy_log = (stack.log_dir / "envoy.log").read_text()
    upstreams = _upstreams(envoy_log)
    for call in failed:
        # In flight on the killed replica: sent before it died, answered after, and Envoy's
        # access log names it as where the call last went.
        where = (call, upstreams.get(call.envoy_request_id or ""))
        assert call.started <= killed_at <= call.ended, where
        assert upstreams.get(call.envoy_request_id or "") == f"127.0.0.1:{killed.grpc_port}", where

    # Each failed call, sent again with its request id, is answered; and so is a sample of
    # acknowledged ones, with what they were answered the first time.
    async with (
        grpc.aio.insecure_channel(fleet.envoy_grpc_target) as channel,
        httpx.AsyncClient(base_url=stack.rest_base, timeout=CALL_TIMEOUT) as rest,
    ):
        for call in failed:
            again = await load.send(
                call.face, call.kind, call.token, call.body, channel, rest, call.request_id
            )
            assert again.answer_id is not None, again
        for call in load.acknowledged("order")[:10] + load.acknowledged("payment")[:10]:
            again = await load.send(
                call.face, call.kind, call.token, call.body, channel, rest, call.request_id
            )
            assert again.answer_id == call.answer_id, (call, again)

    order_ids = {call.answer_id for call in load.acknowledged("order")}
    payment_ids = {call.answer_id for call in load.acknowledged("payment")}
    customers = sorted({call.token for call in load.calls})
    assert customers
    [(orders_stored, request_ids)] = query(
        stack.database_url,
        "SELECT count(*), count(DISTINCT (customer_id, request_id)) FROM orders"
        " WHERE customer_id LIKE %s",
        f"fleet-{run}-%",
    )
    # One order per request id, and exactly the acknowledged ones (a failed call's retry
    # answered one of them).
    assert orders_stored == request_ids == len(order_ids)
    stored_orders = {
        str(order_id)
        for (order_id,) in query(
            stack.database_url,
            "SELECT id FROM orders WHERE customer_id LIKE %s",
            f"fleet-{run}-%",
        )
    }
    assert stored_orders == order_ids
    stored_payments = {
        str(payment_id)
        for (payment_id,) in query(
            stack.database_url,
            "SELECT id FROM payments WHERE order_id = ANY(%s::uuid[])",
            list(order_ids),
        )
    }
    assert payment_ids <= stored_payments
    ledger.track(*(order_id for order_id in order_ids if order_id))
    await no_provider_work_left(stack.database_url)
    await ledger.assert_balanced()
    [(lowest,)] = query(
        stack.database_url,
        "SELECT min(stock) FROM products WHERE id = ANY(%s::uuid[])",
        list(products),
    )
    assert lowest >= 0

    print(
        f"\nfleet: {len(load.calls)} writes ({len(order_ids)} orders, {len(payment_ids)}"
        f" payments); {len(failed)} failed, all in flight on the killed replica"
        f" ({', '.join(sorted({str(call.error)[:60] for call in failed})) or 'none'});"
        f" new replica serving {recovered_at - new_at:.2f} s after it started"
        f" ({recovered_at - killed_at:.2f} s after the kill)"
    )
