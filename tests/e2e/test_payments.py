"""PaymentService end to end: our server, Envoy and localstripe (through Envoy's
fault-injecting provider listener), with the provider failing in every way that matters.

Every test ends with the money invariant (payment_checks.Ledger): what localstripe captured
and refunded for each order agrees with what our database says, no order is charged twice,
and every unit of stock is either on sale or held by a pending or paid order.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from google.type import money_pb2

from devstack.localstripe import DECLINED_CARD, SUCCESS_CARD
from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from marketplace.order.v1 import order_pb2
from marketplace.payment.v1 import payment_pb2
from tests.conftest import Tokens, insert_product, stock_of
from tests.e2e.payment_checks import (
    Ledger,
    Shopper,
    eventually,
    localstripe_event,
    localstripe_webhooks_lost,
    minor_units,
    no_provider_work_left,
    order_snapshot,
    order_status,
    payment_rows,
    payment_snapshot,
    query,
    refusal_of,
    refused,
    stripe_signature,
)
from tests.e2e.statuses import detail_of, status_of_json
from tests.stack import FaultInjector, Stack, server_env, serving_workers

pytestmark = pytest.mark.e2e

# The stack's provider settings (tests/stack.py server_env).
PROVIDER_TIMEOUT = 1.0
PROVIDER_MAX_ATTEMPTS = 3
RECONCILE_AFTER = 1.0
BREAKER_THRESHOLD = 3
BREAKER_RESET = 2.0
# How long a payment in flight keeps the reconciler away (server/app.py).
LEASE = RECONCILE_AFTER + PROVIDER_MAX_ATTEMPTS * (PROVIDER_TIMEOUT + 2.0)

SUCCEEDED = payment_pb2.PAYMENT_STATUS_SUCCEEDED
PENDING = payment_pb2.PAYMENT_STATUS_PENDING
FAILED = payment_pb2.PAYMENT_STATUS_FAILED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(autouse=True)
async def faults(stack: Stack) -> AsyncIterator[FaultInjector]:
    """The provider listener's faults, off before and after every test whatever happens."""
    injector = stack.faults
    await injector.clear()
    try:
        yield injector
    finally:
        await injector.clear()


@pytest.fixture
def ledger(stack: Stack) -> Ledger:
    return Ledger(stack)


@pytest.fixture
def buyer(channel: grpc.aio.Channel, tokens: Tokens) -> Shopper:
    return Shopper(channel, tokens.customer(f"payer-{uuid.uuid4().hex[:12]}"))


@pytest.fixture
def admin(channel: grpc.aio.Channel, tokens: Tokens) -> Shopper:
    return Shopper(channel, tokens.admin())


def usd(amount: str) -> money_pb2.Money:
    units, _, fraction = amount.partition(".")
    return money_pb2.Money(currency_code="USD", units=int(units), nanos=int(fraction.ljust(9, "0")))


async def card(stack: Stack, number: str = SUCCESS_CARD) -> str:
    return await stack.localstripe.payment_method(number)


async def succeeded_intents(stack: Stack, order_id: str) -> list[dict[str, Any]]:
    return [
        intent
        for intent in await stack.localstripe.intents_for_order(order_id)
        if intent["status"] == "succeeded"
    ]


async def charged_intent(stack: Stack, order_id: str) -> dict[str, Any]:
    """Waits (briefly, polling fast) until localstripe has charged the order."""

    async def charged() -> dict[str, Any] | None:
        found = await succeeded_intents(stack, order_id)
        return found[0] if found else None

    return await eventually(charged, within=10, interval=0.02, what="localstripe's charge")


async def settled(payer: Shopper, payment_id: str, within: float) -> payment_pb2.Payment:
    async def outcome() -> payment_pb2.Payment | None:
        payment = await payer.get_payment(payment_id)
        return payment if payment.status != PENDING else None

    return await eventually(outcome, within=within, interval=0.2, what="the payment's outcome")


def retry_delay(refusal_status: Any) -> float:
    info = detail_of(refusal_status, error_details_pb2.RetryInfo)
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


# 1. Success, replays and reuse of a request id


async def test_a_card_pays_the_order_once_whatever_the_replays(
    stack: Stack, buyer: Shopper, ledger: Ledger
) -> None:
    product = ledger.product(stock=5, price="12.50")
    order = await ledger.place(buyer, (product, 2))
    method = await card(stack)
    request_id = str(uuid.uuid4())

    paid = await buyer.pay(order.id, method, request_id)

    assert paid.status == SUCCEEDED
    assert (paid.order_id, paid.amount, paid.amount_refunded) == (order.id, usd("25"), usd("0"))
    assert (paid.provider, paid.failure_code) == ("stripe", "")
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PAID
    assert await buyer.get_payment(paid.id) == paid
    assert await buyer.list_payments(order.id) == [paid]

    replayed = await buyer.pay(order.id, method, request_id)
    assert replayed == paid
    reused = await refused(buyer.pay(order.id, await card(stack), request_id))
    assert (reused.code, reused.reason) == (FAILED_PRECONDITION, "REQUEST_ID_REUSED")

    intents = await stack.localstripe.intents_for_order(order.id)
    assert [(i["id"], i["status"], i["metadata"]["payment_id"]) for i in intents] == [
        (paid.provider_reference, "succeeded", paid.id)
    ]
    assert [p.status for p in payment_rows(stack.database_url, order.id)] == ["SUCCEEDED"]
    assert stock_of(stack.database_url, product) == 3
    await ledger.assert_balanced()


async def test_rest_pays_reads_and_lists_like_grpc(
    stack: Stack, rest: httpx.AsyncClient, buyer: Shopper, ledger: Ledger
) -> None:
    headers = {"authorization": f"Bearer {buyer.token}"}
    product = ledger.product(stock=4, price="9.99")
    order = await ledger.place(buyer, (product, 3))
    method = await card(stack)
    body = {"requestId": str(uuid.uuid4()), "paymentMethod": method}

    created = await rest.post(f"/v1/orders/{order.id}/payments", json=body, headers=headers)
    assert created.status_code == 200, created.text
    assert list(created.json()) == ["payment"]
    payment = json_format.ParseDict(created.json()["payment"], payment_pb2.Payment())
    assert created.json()["payment"]["status"] == "PAYMENT_STATUS_SUCCEEDED"
    assert created.json()["payment"]["amount"] == {
        "currencyCode": "USD",
        "units": "29",
        "nanos": 970000000,
    }
    assert payment == await buyer.get_payment(payment.id)

    got = await rest.get(f"/v1/payments/{payment.id}", headers=headers)
    assert got.status_code == 200, got.text
    assert got.json() == created.json()
    listed = await rest.get(f"/v1/orders/{order.id}/payments", headers=headers)
    assert listed.status_code == 200, listed.text
    assert listed.json() == {"payments": [created.json()["payment"]], "nextPageToken": ""}
    order_reply = await rest.get(f"/v1/orders/{order.id}", headers=headers)
    assert order_reply.json()["order"]["status"] == "ORDER_STATUS_PAID"

    replayed = await rest.post(f"/v1/orders/{order.id}/payments", json=body, headers=headers)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json() == created.json()
    reused = await rest.post(
        f"/v1/orders/{order.id}/payments",
        json={**body, "paymentMethod": await card(stack)},
        headers=headers,
    )
    assert reused.status_code == 400, reused.text
    status = status_of_json(reused.json())
    assert status.code == FAILED_PRECONDITION.value[0]
    assert detail_of(status, error_details_pb2.ErrorInfo).reason == "REQUEST_ID_REUSED"

    assert [i["status"] for i in await stack.localstripe.intents_for_order(order.id)] == [
        "succeeded"
    ]
    await ledger.assert_balanced()


# 2. A declined card leaves the order payable


async def test_a_declined_card_fails_the_payment_and_another_card_pays(
    stack: Stack, buyer: Shopper, ledger: Ledger
) -> None:
    product = ledger.product(stock=3, price="40.00")
    order = await ledger.place(buyer, (product, 1))

    declined = await buyer.pay(order.id, await card(stack, DECLINED_CARD))
    assert declined.status == FAILED
    assert declined.failure_code == "card_declined"
    assert declined.failure_message
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PENDING_PAYMENT
    declined_intent = await stack.localstripe.intent(declined.provider_reference)
    assert declined_intent["status"] == "requires_payment_method"
    assert declined_intent["last_payment_error"]["code"] == "card_declined"

    paid = await buyer.pay(order.id, await card(stack))
    assert paid.status == SUCCEEDED
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PAID
    listed = await buyer.list_payments(order.id)
    assert [(p.id, p.status) for p in listed] == [(paid.id, SUCCEEDED), (declined.id, FAILED)]
    assert [i["id"] for i in await succeeded_intents(stack, order.id)] == [paid.provider_reference]
    await ledger.assert_balanced()


# 3. The provider answers 5xx, then recovers


async def test_a_provider_outage_is_unavailable_and_the_same_request_id_resumes(
    stack: Stack, buyer: Shopper, ledger: Ledger, faults: FaultInjector
) -> None:
    product = ledger.product(stock=2)
    order = await ledger.place(buyer, (product, 1))
    method = await card(stack)
    request_id = str(uuid.uuid4())
    aborted_before = await faults.stat("fault.aborts_injected")

    await faults.abort(503)
    outage = await refused(buyer.pay(order.id, method, request_id))

    assert outage.code == UNAVAILABLE
    assert outage.reason == "PAYMENT_PROVIDER_UNAVAILABLE"
    assert outage.info.metadata["circuit"] == "closed"
    assert retry_delay(outage.status) > 0
    assert await faults.stat("fault.aborts_injected") - aborted_before == PROVIDER_MAX_ATTEMPTS
    [row] = payment_rows(stack.database_url, order.id)
    assert (row.status, row.provider_reference) == ("PENDING", None)
    assert await stack.localstripe.intents_for_order(order.id) == []

    await faults.clear()
    resumed = await buyer.pay(order.id, method, request_id)

    assert (resumed.id, resumed.status) == (row.id, SUCCEEDED)
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PAID
    intents = await stack.localstripe.intents_for_order(order.id)
    assert [(i["id"], i["status"]) for i in intents] == [(resumed.provider_reference, "succeeded")]
    await ledger.assert_balanced()


# 4. The provider hangs on the charge


async def test_a_hanging_charge_stays_pending_until_the_reconciler_settles_it(
    stack: Stack, buyer: Shopper, ledger: Ledger, faults: FaultInjector
) -> None:
    product = ledger.product(stock=2)
    order = await ledger.place(buyer, (product, 1))

    # Every confirm waits 2.5 s in Envoy, longer than the 1 s each attempt may take: the
    # adapter gives up on each (the outcome is unknown to it) and the call answers PENDING.
    await faults.delay(ms=2500, confirm_only=True)
    pending = await buyer.pay(order.id, await card(stack))

    assert pending.status == PENDING
    assert pending.provider_reference.startswith("pi_")
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PENDING_PAYMENT
    # While its outcome is unknown nobody else may pay (or charge) the order.
    busy = await refused(buyer.pay(order.id, await card(stack)))
    assert (busy.code, busy.reason) == (FAILED_PRECONDITION, "PAYMENT_IN_PROGRESS")
    assert busy.info.metadata["paymentId"] == pending.id
    assert len(payment_rows(stack.database_url, order.id)) == 1

    await faults.clear()
    final = await settled(buyer, pending.id, within=LEASE + 20)

    # The stalled confirms were dropped by Envoy when the adapter hung up, so localstripe
    # never charged; the reconciler cancelled the intent so that it never can.
    intent = await stack.localstripe.intent(pending.provider_reference)
    assert intent["status"] == "canceled"
    assert await stack.localstripe.charges_for(intent["id"]) == []
    assert (final.status, final.failure_code) == (FAILED, "abandoned")
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PENDING_PAYMENT

    paid = await buyer.pay(order.id, await card(stack))
    assert paid.status == SUCCEEDED
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PAID
    await ledger.assert_balanced()


# 5. The circuit breaker


async def test_the_circuit_opens_refuses_without_the_provider_and_a_probe_closes_it(
    stack: Stack, tokens: Tokens, ledger: Ledger, faults: FaultInjector
) -> None:
    # Background passes must not talk to the provider while requests are counted here.
    await no_provider_work_left(stack.database_url)
    product = ledger.product(stock=4)
    # One channel is one connection, hence one server worker, hence one circuit.
    async with grpc.aio.insecure_channel(stack.grpc_target) as own_channel:
        payer = Shopper(own_channel, tokens.customer(f"circuit-{uuid.uuid4().hex[:12]}"))
        first = await payer.place_order((product, 1))
        second = await payer.place_order((product, 1))
        ledger.track(first.id, second.id)
        method = await card(stack)
        first_request, second_request = str(uuid.uuid4()), str(uuid.uuid4())

        await faults.abort(503)
        circuits = []
        for _ in range(BREAKER_THRESHOLD + 1):
            outage = await refused(payer.pay(first.id, method, first_request))
            assert (outage.code, outage.reason) == (UNAVAILABLE, "PAYMENT_PROVIDER_UNAVAILABLE")
            circuits.append(outage.info.metadata["circuit"])
            if circuits[-1] == "open":
                break
        assert circuits[-1] == "open", circuits
        assert set(circuits[:-1]) <= {"closed"}, circuits

        requests_before = await faults.stat("downstream_rq_total")
        fast = await refused(payer.pay(second.id, method, second_request))
        assert (fast.code, fast.reason) == (UNAVAILABLE, "PAYMENT_PROVIDER_UNAVAILABLE")
        assert fast.info.metadata["circuit"] == "open"
        assert await faults.stat("downstream_rq_total") == requests_before
        assert payment_rows(stack.database_url, second.id) == []
        wait = retry_delay(fast.status)
        assert 0 < wait <= BREAKER_RESET

        await faults.clear()
        await asyncio.sleep(wait + 0.1)  # the server said when; nothing to poll meanwhile
        probe = await payer.pay(second.id, method, second_request)
        assert probe.status == SUCCEEDED
        resumed = await payer.pay(first.id, method, first_request)
        assert resumed.status == SUCCEEDED
        [row] = payment_rows(stack.database_url, first.id)
        assert row.id == resumed.id
    for order in (first, second):
        assert order_status(stack.database_url, order.id) == "PAID"
        assert len(await succeeded_intents(stack, order.id)) == 1
    await ledger.assert_balanced()


# 6. Two payments of one order at once


async def test_concurrent_payments_of_one_order_charge_it_once(
    stack: Stack, buyer: Shopper, ledger: Ledger
) -> None:
    product = ledger.product(stock=10, price="3.00")
    async with grpc.aio.insecure_channel(stack.grpc_target) as other_channel:
        for _ in range(5):
            order = await ledger.place(buyer, (product, 1))
            methods = [await card(stack), await card(stack)]
            outcomes = await asyncio.gather(
                buyer.pay(order.id, methods[0]),
                buyer.on(other_channel).pay(order.id, methods[1]),
                return_exceptions=True,
            )
            paid = [o for o in outcomes if isinstance(o, payment_pb2.Payment)]
            errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert len(paid) == 1, outcomes
            assert len(errors) == 1, outcomes
            assert paid[0].status == SUCCEEDED
            loser = refusal_of(errors[0])
            assert loser.code == FAILED_PRECONDITION
            assert loser.reason in ("PAYMENT_IN_PROGRESS", "ORDER_NOT_PAYABLE")
            assert [p.id for p in payment_rows(stack.database_url, order.id)] == [paid[0].id]
            assert [i["id"] for i in await succeeded_intents(stack, order.id)] == [
                paid[0].provider_reference
            ]
    await ledger.assert_balanced()


# 7. Webhooks


async def test_webhooks_need_the_providers_signature_and_apply_once(
    stack: Stack, rest: httpx.AsyncClient, buyer: Shopper, ledger: Ledger, faults: FaultInjector
) -> None:
    product = ledger.product(stock=2, price="15.00")
    order = await ledger.place(buyer, (product, 1))
    method = await card(stack)
    async with localstripe_webhooks_lost(stack):
        # A charge the provider made whose answer never reached us: the confirm's answer
        # trickles back, and every look at the intent after it fails.
        await faults.throttle_responses(confirm_only=True)
        paying = asyncio.ensure_future(buyer.pay(order.id, method))
        intent = await charged_intent(stack, order.id)
        await faults.abort(503)
        pending = await paying
        await faults.clear()
        assert (pending.status, pending.provider_reference) == (PENDING, intent["id"])

        event = await localstripe_event(stack, "payment_intent.succeeded", intent["id"])
        assert event is not None
        payload = json.dumps(event).encode()
        before = payment_snapshot(stack.database_url)

        forged = await rest.post(
            "/v1/payments:webhook",
            content=payload,
            headers={
                "content-type": "application/json",
                "stripe-signature": stripe_signature(payload, secret="whsec_not_the_secret"),
            },
        )
        assert forged.status_code == 401, forged.text
        status = status_of_json(forged.json())
        assert detail_of(status, error_details_pb2.ErrorInfo).reason == "INVALID_SIGNATURE"
        assert payment_snapshot(stack.database_url) == before
        assert (await buyer.get_payment(pending.id)).status == PENDING

        for delivery in range(2):
            delivered = await rest.post(
                "/v1/payments:webhook",
                content=payload,
                headers={
                    "content-type": "application/json",
                    "stripe-signature": stripe_signature(payload),
                },
            )
            assert delivered.status_code == 200, delivered.text
            if delivery == 0:
                after_first = payment_snapshot(stack.database_url)
        assert payment_snapshot(stack.database_url) == after_first

    payment = await buyer.get_payment(pending.id)
    assert payment.status == SUCCEEDED
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PAID
    assert query(stack.database_url, "SELECT type FROM provider_events WHERE id = %s", event["id"])
    await ledger.assert_balanced()


# 8. A crash between the provider's charge and our commit


async def test_a_server_killed_after_the_charge_is_reconciled_after_restart(
    stack: Stack, tokens: Tokens, ledger: Ledger, faults: FaultInjector, tmp_path: Path
) -> None:
    provider_timeout, max_attempts, reconcile_after = 5.0, 1, 0.5
    lease = reconcile_after + max_attempts * (provider_timeout + 2.0)  # server/app.py
    port = free_port()
    env = {
        **server_env(stack.database_url, port, stack.provider_proxy_port),
        # SERVER_WORKERS=1 runs the server in this very process (server/supervisor.py), so
        # killing it kills everything that could finish the payment.
        "SERVER_WORKERS": "1",
        # Long enough that the slowed answer is still arriving when the process dies.
        "PROVIDER_TIMEOUT": str(provider_timeout),
        "PROVIDER_MAX_ATTEMPTS": str(max_attempts),
        "RECONCILE_AFTER": str(reconcile_after),
        "BACKGROUND_INTERVAL": "0.2",
    }
    product = ledger.product(stock=2, price="20.00")
    token = tokens.customer(f"crash-{uuid.uuid4().hex[:12]}")
    # Lost webhooks: only reconciliation can settle the payment.
    async with localstripe_webhooks_lost(stack):
        with (tmp_path / "server.log").open("wb") as log:
            server = start_server(env, log=log)
        try:
            wait_for_grpc(port, server)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                payer = Shopper(channel, token)
                order = await ledger.place(payer, (product, 1))
                method = await card(stack)
                await faults.throttle_responses(confirm_only=True)
                paying = asyncio.ensure_future(payer.pay(order.id, method))
                intent = await charged_intent(stack, order.id)
                server.kill()
                server.wait()
                lost = await refused(paying)
                assert lost.code == UNAVAILABLE
            await faults.clear()
            [row] = payment_rows(stack.database_url, order.id)
            # The charge happened and we never recorded its outcome: the window under test.
            assert (row.status, row.provider_reference) == ("PENDING", intent["id"])

            with (tmp_path / "restarted.log").open("wb") as log:
                server = start_server(env, log=log)
            wait_for_grpc(port, server)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                payer = Shopper(channel, token)
                payment = await settled(payer, row.id, within=lease + 15)
                assert payment.status == SUCCEEDED
                assert (await payer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PAID
        finally:
            stop_process(server)
    intents = await stack.localstripe.intents_for_order(order.id)
    assert [(i["id"], i["status"]) for i in intents] == [(intent["id"], "succeeded")]
    await ledger.assert_balanced()


# 9. Expiry with several processes sweeping at once


async def test_orders_expire_once_while_several_processes_sweep(
    stack: Stack, tokens: Tokens, buyer: Shopper, ledger: Ledger, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **server_env(stack.database_url, port, stack.provider_proxy_port),
        "SERVER_WORKERS": "2",
        "ORDER_PAYMENT_TIMEOUT": "1",
        "BACKGROUND_INTERVAL": "0.1",
    }
    products = [ledger.product(stock=100, price="2.00") for _ in range(2)]
    prefix = f"expiry-{uuid.uuid4().hex[:12]}"
    with (tmp_path / "server.log").open("wb") as log:
        server = start_server(env, log=log)
    try:
        wait_for_grpc(port, server)

        async def both_workers() -> bool:
            return len(serving_workers(server.pid)) == 2

        await eventually(both_workers, within=20, what="two workers")
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
        try:
            placed = await asyncio.gather(
                *(
                    Shopper(channels[n % 4], tokens.customer(f"{prefix}-{n}")).place_order(
                        (products[0], 1 + n % 3), (products[1], 1 + n % 2)
                    )
                    for n in range(40)
                )
            )
        finally:
            for channel in channels:
                await channel.close()
        order_ids = [order.id for order in placed]
        ledger.track(*order_ids)

        async def all_expired() -> bool:
            rows = query(
                stack.database_url,
                "SELECT status, count(*) FROM orders WHERE id = ANY(%s) GROUP BY status",
                [uuid.UUID(order_id) for order_id in order_ids],
            )
            return rows == [("EXPIRED", 40)]

        await eventually(all_expired, within=30, what="every order to expire")
    finally:
        assert stop_process(server) == 0

    for product in products:
        assert stock_of(stack.database_url, product) == 100
    owner = Shopper(buyer.channel, tokens.customer(f"{prefix}-0"))
    late = await refused(owner.pay(order_ids[0], await card(stack)))
    assert (late.code, late.reason) == (FAILED_PRECONDITION, "ORDER_NOT_PAYABLE")
    assert late.info.metadata["status"] == "EXPIRED"
    assert payment_rows(stack.database_url, order_ids[0]) == []
    await ledger.assert_balanced()


# 10. Cancellation of paid orders and refunds


async def test_cancelling_a_paid_order_refunds_it_and_restocks(
    stack: Stack, rest: httpx.AsyncClient, buyer: Shopper, ledger: Ledger
) -> None:
    product = ledger.product(stock=6, price="7.50")
    by_grpc = await buyer.place_order((product, 2))
    by_rest = await buyer.place_order((product, 2))
    ledger.track(by_grpc.id, by_rest.id)
    payments = [
        await buyer.pay(by_grpc.id, await card(stack)),
        await buyer.pay(by_rest.id, await card(stack)),
    ]
    assert [p.status for p in payments] == [SUCCEEDED, SUCCEEDED]
    assert stock_of(stack.database_url, product) == 2

    cancelled = await buyer.cancel_order(by_grpc.id)
    assert cancelled.status == order_pb2.ORDER_STATUS_CANCELLED
    assert stock_of(stack.database_url, product) == 4

    reply = await rest.post(
        f"/v1/orders/{by_rest.id}:cancel",
        json={"requestId": str(uuid.uuid4())},
        headers={"authorization": f"Bearer {buyer.token}"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["order"]["status"] == "ORDER_STATUS_CANCELLED"
    assert stock_of(stack.database_url, product) == 6

    for payment in payments:
        refunded = await buyer.get_payment(payment.id)
        assert refunded.status == payment_pb2.PAYMENT_STATUS_REFUNDED
        assert refunded.amount_refunded == usd("15")
        refunds = await stack.localstripe.refunds_for(payment.provider_reference)
        assert [(r["amount"], r["status"]) for r in refunds] == [(1500, "succeeded")]
    await ledger.assert_balanced()


async def test_a_partial_refund_then_the_rest_refunds_the_order(
    stack: Stack, rest: httpx.AsyncClient, buyer: Shopper, admin: Shopper, ledger: Ledger
) -> None:
    product = ledger.product(stock=5, price="10.00")
    order = await ledger.place(buyer, (product, 3))
    paid = await buyer.pay(order.id, await card(stack))

    part = await admin.refund(paid.id, "12.50")
    assert part.status == payment_pb2.PAYMENT_STATUS_PARTIALLY_REFUNDED
    assert part.amount_refunded == usd("12.50")
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PAID
    assert stock_of(stack.database_url, product) == 2
    await ledger.assert_balanced()

    rows_before = order_snapshot(stack.database_url, order.id)
    refunds_before = await stack.localstripe.refunds_for(paid.provider_reference)
    too_much = await refused(admin.refund(paid.id, "17.51"))
    assert (too_much.code, too_much.reason) == (FAILED_PRECONDITION, "REFUND_EXCEEDS_PAYMENT")
    assert Decimal(too_much.info.metadata["refundable"]) == Decimal("17.50")
    assert order_snapshot(stack.database_url, order.id) == rows_before
    assert await stack.localstripe.refunds_for(paid.provider_reference) == refunds_before

    rest_of_it = await rest.post(
        f"/v1/payments/{paid.id}:refund",
        json={"requestId": str(uuid.uuid4()), "reason": "the rest"},
        headers={"authorization": f"Bearer {admin.token}"},
    )
    assert rest_of_it.status_code == 200, rest_of_it.text
    payment = json_format.ParseDict(rest_of_it.json()["payment"], payment_pb2.Payment())
    assert payment.status == payment_pb2.PAYMENT_STATUS_REFUNDED
    assert payment.amount_refunded == usd("30")
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_REFUNDED
    assert stock_of(stack.database_url, product) == 5
    refunds = await stack.localstripe.refunds_for(paid.provider_reference)
    assert sorted(r["amount"] for r in refunds) == [minor_units(Decimal("12.50")), 1750]
    await ledger.assert_balanced()


async def test_refunds_are_for_admins_and_payments_for_their_owner(
    stack: Stack, buyer: Shopper, tokens: Tokens, ledger: Ledger
) -> None:
    product = ledger.product(stock=2, price="5.00")
    order = await ledger.place(buyer, (product, 1))
    paid = await buyer.pay(order.id, await card(stack))
    rows_before = order_snapshot(stack.database_url, order.id)

    by_customer = await refused(buyer.refund(paid.id))
    assert by_customer.code == grpc.StatusCode.PERMISSION_DENIED

    stranger = Shopper(buyer.channel, tokens.customer(f"stranger-{uuid.uuid4().hex[:12]}"))
    hidden = [
        await refused(stranger.get_payment(paid.id)),
        await refused(stranger.list_payments(order.id)),
        await refused(stranger.pay(order.id, await card(stack))),
    ]
    assert [(h.code, h.reason) for h in hidden] == [(grpc.StatusCode.NOT_FOUND, "NOT_FOUND")] * 3

    assert order_snapshot(stack.database_url, order.id) == rows_before
    assert await stack.localstripe.refunds_for(paid.provider_reference) == []
    await ledger.assert_balanced()


# 11. Forged webhooks: the provider's word decides, never the event's


async def test_a_signed_event_never_pays_an_order_the_provider_did_not_charge(
    stack: Stack, rest: httpx.AsyncClient, buyer: Shopper, ledger: Ledger
) -> None:
    product = ledger.product(stock=2, price="10.00")
    order = await ledger.place(buyer, (product, 1))
    declined = await buyer.pay(order.id, await card(stack, DECLINED_CARD))
    assert declined.status == FAILED
    intent = await stack.localstripe.intent(declined.provider_reference)
    assert intent["status"] == "requires_payment_method"
    # Signed with the endpoint's secret, as whoever holds it could: the event claims the
    # declined intent succeeded, in the shape of a real one.
    forged = json.dumps(
        {
            "id": f"evt_forged_{uuid.uuid4().hex}",
            "object": "event",
            "type": "payment_intent.succeeded",
            "data": {
                "object": {
                    **intent,
                    "status": "succeeded",
                    "last_payment_error": None,
                    "amount_received": intent["amount"],
                }
            },
        }
    ).encode()
    before = order_snapshot(stack.database_url, order.id)

    delivered = await rest.post(
        "/v1/payments:webhook",
        content=forged,
        headers={"content-type": "application/json", "stripe-signature": stripe_signature(forged)},
    )

    assert delivered.status_code == 200, delivered.text
    assert order_snapshot(stack.database_url, order.id) == before
    assert (await buyer.get_order(order.id)).status == order_pb2.ORDER_STATUS_PENDING_PAYMENT
    assert (await buyer.get_payment(declined.id)).status == FAILED
    await ledger.assert_balanced()


# 12. Concurrent refunds and cancels: one provider refund per refund row


CONCURRENT_CALLS = 30
Answer = TypeVar("Answer", payment_pb2.Payment, order_pb2.Order)


async def _paid_ten_dollar_order(
    stack: Stack, buyer: Shopper, ledger: Ledger
) -> tuple[str, payment_pb2.Payment]:
    product = ledger.product(stock=3, price="10.00")
    order = await ledger.place(buyer, (product, 1))
    paid = await buyer.pay(order.id, await card(stack))
    assert paid.status == SUCCEEDED
    return product, paid


def _refund_rows(database_url: str, payment_id: str) -> list[tuple[str, Decimal]]:
    rows = query(
        database_url, "SELECT status, amount FROM refunds WHERE payment_id = %s", payment_id
    )
    return [(str(status), Decimal(amount)) for status, amount in rows]


async def _provider_refunds(stack: Stack, intent_id: str) -> list[int]:
    return sorted(r["amount"] for r in await stack.localstripe.refunds_for(intent_id))


async def _at_once(
    stack: Stack, caller: Shopper, call: Callable[[Shopper], Awaitable[Answer]]
) -> list[Answer | BaseException]:
    """CONCURRENT_CALLS of `call` at once, over two connections (so both server workers)."""
    async with grpc.aio.insecure_channel(stack.grpc_target) as other_channel:
        callers = [caller, caller.on(other_channel)]
        return await asyncio.gather(
            *(call(callers[n % 2]) for n in range(CONCURRENT_CALLS)), return_exceptions=True
        )


def _statuses(answers: list[Answer | BaseException], kind: type[Answer]) -> set[Any]:
    """The statuses of `answers`, every one of which must be a `kind` (not an error)."""
    assert [a for a in answers if not isinstance(a, kind)] == []
    return {a.status for a in answers if isinstance(a, kind)}


async def test_concurrent_retries_of_one_refund_refund_once_at_the_provider(
    stack: Stack, admin: Shopper, buyer: Shopper, ledger: Ledger
) -> None:
    _, paid = await _paid_ten_dollar_order(stack, buyer, ledger)
    request_id = str(uuid.uuid4())

    answers = await _at_once(stack, admin, lambda a: a.refund(paid.id, request_id=request_id))

    assert _statuses(answers, payment_pb2.Payment) == {payment_pb2.PAYMENT_STATUS_REFUNDED}
    assert await _provider_refunds(stack, paid.provider_reference) == [1000]
    assert _refund_rows(stack.database_url, paid.id) == [("SUCCEEDED", Decimal("10"))]
    await ledger.assert_balanced()


async def test_concurrent_distinct_refunds_never_refund_more_than_was_captured(
    stack: Stack, admin: Shopper, buyer: Shopper, ledger: Ledger
) -> None:
    _, paid = await _paid_ten_dollar_order(stack, buyer, ledger)

    answers = await _at_once(stack, admin, lambda a: a.refund(paid.id, "1.00"))

    for outcome in answers:
        if isinstance(outcome, grpc.aio.AioRpcError):
            refusal = refusal_of(outcome)
            assert refusal.code == FAILED_PRECONDITION, refusal.status.message
            assert refusal.reason in ("REFUND_IN_PROGRESS", "REFUND_EXCEEDS_PAYMENT")
        else:
            assert isinstance(outcome, payment_pb2.Payment), outcome
    await no_provider_work_left(stack.database_url)
    succeeded = [a for s, a in _refund_rows(stack.database_url, paid.id) if s == "SUCCEEDED"]
    provider = await _provider_refunds(stack, paid.provider_reference)
    assert provider == [100] * len(succeeded)
    assert sum(provider) <= 1000
    await ledger.assert_balanced()


async def test_concurrent_cancels_of_a_paid_order_refund_it_once(
    stack: Stack, buyer: Shopper, ledger: Ledger
) -> None:
    product, paid = await _paid_ten_dollar_order(stack, buyer, ledger)

    answers = await _at_once(stack, buyer, lambda b: b.cancel_order(paid.order_id))

    assert _statuses(answers, order_pb2.Order) == {order_pb2.ORDER_STATUS_CANCELLED}
    assert await _provider_refunds(stack, paid.provider_reference) == [1000]
    assert _refund_rows(stack.database_url, paid.id) == [("SUCCEEDED", Decimal("10"))]
    assert stock_of(stack.database_url, product) == 3
    await ledger.assert_balanced()


# 13. A payment the provider has no record of


async def test_a_payment_the_provider_lost_is_an_explicit_error_with_an_admins_way_out(
    stack: Stack, rest: httpx.AsyncClient, admin: Shopper, buyer: Shopper
) -> None:
    product = insert_product(stack.database_url, stock=3, price="10.00")
    order = await buyer.place_order((product, 1))
    paid = await buyer.pay(order.id, await card(stack))
    # As after make run's localstripe lost its store: the charge we hold names an intent the
    # provider has no record of. (Not in a Ledger: the provider's books cannot balance.)
    lost = f"pi_lost{uuid.uuid4().hex[:20]}"
    query(
        stack.database_url,
        "UPDATE payments SET provider_reference = %s WHERE id = %s RETURNING id",
        lost,
        paid.id,
    )
    request_id = str(uuid.uuid4())

    refusals = [
        await refused(admin.refund(paid.id, request_id=request_id)),
        await refused(admin.refund(paid.id, request_id=request_id)),  # a retry: the same
        await refused(buyer.cancel_order(order.id)),
    ]

    for refusal in refusals:
        assert (refusal.code, refusal.reason) == (
            FAILED_PRECONDITION,
            "PAYMENT_UNKNOWN_TO_PROVIDER",
        )
        assert refusal.info.metadata["paymentId"] == paid.id
        assert refusal.info.metadata["providerReference"] == lost
        assert "outside_provider" in refusal.status.message
    assert order_status(stack.database_url, order.id) == "PAID"
    assert stock_of(stack.database_url, product) == 2
    assert await stack.localstripe.refunds_for(paid.provider_reference) == []

    # The way out: an admin records the refund as made outside the provider.
    reply = await rest.post(
        f"/v1/payments/{paid.id}:refund",
        json={"requestId": str(uuid.uuid4()), "reason": "by hand", "outsideProvider": True},
        headers={"authorization": f"Bearer {admin.token}"},
    )

    assert reply.status_code == 200, reply.text
    payment = json_format.ParseDict(reply.json()["payment"], payment_pb2.Payment())
    assert (payment.status, payment.amount_refunded) == (
        payment_pb2.PAYMENT_STATUS_REFUNDED,
        usd("10"),
    )
    assert order_status(stack.database_url, order.id) == "REFUNDED"
    assert stock_of(stack.database_url, product) == 3
    succeeded = query(
        stack.database_url,
        "SELECT amount, provider_reference FROM refunds"
        " WHERE payment_id = %s AND status = 'SUCCEEDED'",
        paid.id,
    )
    assert succeeded == [(Decimal("10.000000000"), None)]
    assert await stack.localstripe.refunds_for(paid.provider_reference) == []


async def test_a_refund_outside_the_provider_is_refused_while_it_knows_the_payment(
    stack: Stack, admin: Shopper, buyer: Shopper, ledger: Ledger
) -> None:
    _, paid = await _paid_ten_dollar_order(stack, buyer, ledger)
    before = order_snapshot(stack.database_url, paid.order_id)

    refusal = await refused(admin.refund(paid.id, outside_provider=True))

    assert (refusal.code, refusal.reason) == (FAILED_PRECONDITION, "PAYMENT_KNOWN_TO_PROVIDER")
    assert refusal.info.metadata["providerReference"] == paid.provider_reference
    assert order_snapshot(stack.database_url, paid.order_id) == before
    await ledger.assert_balanced()
