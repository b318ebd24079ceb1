"""What the payment e2e tests share: the money invariant (localstripe against our database),
stock accounting, reading rich errors, signing webhooks, and polling with a deadline.

The evidence for money always comes from localstripe's own port (never through Envoy or
our server), and for stock and rows from the database, so a test can never be satisfied by
what the API merely says about itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from google.rpc import error_details_pb2, status_pb2
from google.type import money_pb2

from devstack.localstripe import LOCALSTRIPE_API_KEY, WEBHOOK_PATH, register_localstripe_webhook
from devstack.processes import free_port
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from marketplace.payment.v1 import payment_pb2, payment_pb2_grpc
from tests.conftest import eventually, insert_product
from tests.e2e.statuses import detail_of, status_of_rpc_error
from tests.stack import WEBHOOK_SECRET, Stack, bearer

# Every table a payment, a refund or a webhook can touch (tests/conftest.py's
# table_snapshot predates payments).
PAYMENT_TABLES = ("products", "orders", "order_lines", "payments", "refunds", "provider_events")
# Order statuses that hold their units (tests mirror server/domain/orders.py on purpose:
# an independent statement of the rule, not an import of the code under test).
HOLDS_STOCK = ("PENDING_PAYMENT", "PAID")
TAKEN_MONEY = ("SUCCEEDED", "PARTIALLY_REFUNDED", "REFUNDED")


# --- calling the API -----------------------------------------------------------------------

# Longer than CreatePayment can take with the stack's provider settings (3 attempts of 1 s
# plus backoff), so a deadline never decides a test.
CALL_TIMEOUT = 30


@dataclass(frozen=True)
class Shopper:
    """One caller (a customer or an admin) on one gRPC channel, i.e. one server worker."""

    channel: grpc.aio.Channel
    token: str

    def on(self, channel: grpc.aio.Channel) -> Shopper:
        return Shopper(channel, self.token)

    @property
    def _metadata(self) -> tuple[tuple[str, str]]:
        return bearer(self.token)

    @property
    def _orders(self) -> order_pb2_grpc.OrderServiceStub:
        return order_pb2_grpc.OrderServiceStub(self.channel)

    @property
    def _payments(self) -> payment_pb2_grpc.PaymentServiceStub:
        return payment_pb2_grpc.PaymentServiceStub(self.channel)

    async def place_order(self, *items: tuple[str, int]) -> order_pb2.Order:
        request = order_pb2.CreateOrderRequest(
            request_id=str(uuid.uuid4()),
            items=[order_pb2.OrderItem(product_id=p, quantity=q) for p, q in items],
        )
        reply = await self._orders.CreateOrder(
            request, metadata=self._metadata, timeout=CALL_TIMEOUT
        )
        return reply.order

    async def get_order(self, order_id: str) -> order_pb2.Order:
        reply = await self._orders.GetOrder(
            order_pb2.GetOrderRequest(id=order_id), metadata=self._metadata, timeout=CALL_TIMEOUT
        )
        return reply.order

    async def cancel_order(self, order_id: str) -> order_pb2.Order:
        reply = await self._orders.CancelOrder(
            order_pb2.CancelOrderRequest(id=order_id, request_id=str(uuid.uuid4())),
            metadata=self._metadata,
            timeout=CALL_TIMEOUT,
        )
        return reply.order

    async def pay(
        self, order_id: str, payment_method: str, request_id: str | None = None
    ) -> payment_pb2.Payment:
        reply = await self._payments.CreatePayment(
            payment_pb2.CreatePaymentRequest(
                order_id=order_id,
                request_id=request_id or str(uuid.uuid4()),
                payment_method=payment_method,
            ),
            metadata=self._metadata,
            timeout=CALL_TIMEOUT,
        )
        return reply.payment

    async def get_payment(self, payment_id: str) -> payment_pb2.Payment:
        reply = await self._payments.GetPayment(
            payment_pb2.GetPaymentRequest(id=payment_id),
            metadata=self._metadata,
            timeout=CALL_TIMEOUT,
        )
        return reply.payment

    async def list_payments(self, order_id: str) -> list[payment_pb2.Payment]:
        reply = await self._payments.ListPayments(
            payment_pb2.ListPaymentsRequest(order_id=order_id),
            metadata=self._metadata,
            timeout=CALL_TIMEOUT,
        )
        assert reply.next_page_token == ""
        return list(reply.payments)

    async def refund(
        self,
        payment_id: str,
        amount: str | None = None,
        request_id: str | None = None,
        *,
        outside_provider: bool = False,
    ) -> payment_pb2.Payment:
        request = payment_pb2.RefundPaymentRequest(
            id=payment_id,
            request_id=request_id or str(uuid.uuid4()),
            reason="e2e",
            outside_provider=outside_provider,
        )
        if amount is not None:
            units, _, cents = amount.partition(".")
            request.amount.CopyFrom(
                money_pb2.Money(
                    currency_code="USD", units=int(units), nanos=int(cents.ljust(9, "0"))
                )
            )
        reply = await self._payments.RefundPayment(
            request, metadata=self._metadata, timeout=CALL_TIMEOUT
        )
        return reply.payment


# --- rich errors -------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    status: status_pb2.Status

    @property
    def info(self) -> error_details_pb2.ErrorInfo:
        return detail_of(self.status, error_details_pb2.ErrorInfo)

    @property
    def reason(self) -> str:
        return self.info.reason


def refusal_of(error: grpc.aio.AioRpcError) -> Refusal:
    return Refusal(error.code(), status_of_rpc_error(error))


async def refused(call: Awaitable[Any]) -> Refusal:
    """The gRPC error `call` ends with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return refusal_of(caught.value)


# --- database ----------------------------------------------------------------------------


def query(database_url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(sql, params).fetchall()


def payment_snapshot(database_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table payments touch, to prove a refused request changed nothing."""
    with psycopg.connect(database_url) as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in PAYMENT_TABLES
        }


def order_snapshot(database_url: str, order_id: str) -> dict[str, list[tuple[object, ...]]]:
    """One order's rows: the order, its products, payments and refunds. Narrower than
    payment_snapshot, so provider events that other work delivers meanwhile do not count."""
    with psycopg.connect(database_url) as conn:
        return {
            "orders": conn.execute("SELECT * FROM orders WHERE id = %s", (order_id,)).fetchall(),
            "products": conn.execute(
                "SELECT * FROM products WHERE id IN"
                " (SELECT product_id FROM order_lines WHERE order_id = %s) ORDER BY id",
                (order_id,),
            ).fetchall(),
            "payments": conn.execute(
                "SELECT * FROM payments WHERE order_id = %s ORDER BY id", (order_id,)
            ).fetchall(),
            "refunds": conn.execute(
                "SELECT * FROM refunds WHERE payment_id IN"
                " (SELECT id FROM payments WHERE order_id = %s) ORDER BY id",
                (order_id,),
            ).fetchall(),
        }


def order_status(database_url: str, order_id: str) -> str:
    [(status,)] = query(database_url, "SELECT status FROM orders WHERE id = %s", order_id)
    return str(status)


@dataclass(frozen=True)
class PaymentRow:
    id: str
    status: str
    amount: Decimal
    amount_refunded: Decimal
    provider_reference: str | None
    failure_code: str


def payment_rows(database_url: str, order_id: str) -> list[PaymentRow]:
    rows = query(
        database_url,
        "SELECT id, status, amount, amount_refunded, provider_reference, failure_code"
        " FROM payments WHERE order_id = %s ORDER BY create_time, id",
        order_id,
    )
    return [PaymentRow(str(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in rows]


def provider_work_left(database_url: str) -> int:
    """Payments and refunds the reconciler would still ask the provider about."""
    [(count,)] = query(
        database_url,
        "SELECT (SELECT count(*) FROM payments"
        "         WHERE status = 'PENDING' AND provider_reference IS NOT NULL)"
        "     + (SELECT count(*) FROM refunds WHERE status = 'PENDING')",
    )
    return int(count)


async def no_provider_work_left(database_url: str) -> None:
    """Waits until no background pass of any server will call the provider, so a test can
    count the provider listener's requests (or snapshot tables) without interference."""

    async def idle() -> bool:
        return provider_work_left(database_url) == 0

    await eventually(idle, within=30, what="no payment or refund left for the reconciler")


# --- the money invariant -------------------------------------------------------------------


def minor_units(amount: Decimal) -> int:
    """USD cents; every product these tests create is priced in USD."""
    cents = amount * 100
    assert cents == cents.to_integral_value(), amount
    return int(cents)


@dataclass
class Ledger:
    """The products and orders one test touches; `assert_balanced` proves that what the
    provider holds, what our database says, and where the stock is all agree."""

    stack: Stack
    initial_stock: dict[str, int] = field(default_factory=dict)
    orders: list[str] = field(default_factory=list)

    def product(self, *, stock: int, price: str = "10.00") -> str:
        product_id = insert_product(self.stack.database_url, stock=stock, price=price)
        self.initial_stock[product_id] = stock
        return product_id

    async def place(self, shopper: Shopper, *items: tuple[str, int]) -> order_pb2.Order:
        """`shopper` orders `items`; the order is checked by `assert_balanced`."""
        order = await shopper.place_order(*items)
        self.track(order.id)
        return order

    def track(self, *order_ids: str) -> None:
        self.orders.extend(order_id for order_id in order_ids if order_id not in self.orders)

    async def assert_balanced(self) -> None:
        intents = await self.stack.localstripe.list_payment_intents()
        for order_id in self.orders:
            await self._assert_order_balanced(
                order_id, [i for i in intents if i["metadata"].get("order_id") == order_id]
            )
        self._assert_stock_accounted()

    async def _assert_order_balanced(self, order_id: str, intents: list[dict[str, Any]]) -> None:
        database_url = self.stack.database_url
        [(status, currency, total)] = query(
            database_url, "SELECT status, currency, total FROM orders WHERE id = %s", order_id
        )
        payments = payment_rows(database_url, order_id)
        where = f"order {order_id} ({status})"
        # Every intent belongs to one of our payments; only a recorded one can ever charge.
        references = {p.provider_reference for p in payments if p.provider_reference}
        assert {i["id"] for i in intents} <= references, (where, intents, payments)
        for intent in intents:
            assert intent["currency"] == currency.lower(), (where, intent)
            assert intent["amount"] == minor_units(total), (where, intent)
        succeeded = [i for i in intents if i["status"] == "succeeded"]
        assert len(succeeded) <= 1, (where, "charged more than once", succeeded)
        captured = refunded = 0
        for intent in succeeded:
            charges = [
                c
                for c in await self.stack.localstripe.charges_for(intent["id"])
                if c["status"] == "succeeded" and c["captured"]
            ]
            assert [c["amount"] for c in charges] == [intent["amount"]], (where, charges)
            captured += intent["amount"]
            refunds = await self.stack.localstripe.refunds_for(intent["id"])
            refunded += sum(r["amount"] for r in refunds if r["status"] == "succeeded")
        for intent in intents:
            if intent["status"] != "succeeded":
                charged = [
                    c
                    for c in await self.stack.localstripe.charges_for(intent["id"])
                    if c["status"] == "succeeded"
                ]
                assert charged == [], (where, "a charge outside a succeeded intent", charged)

        live = [p for p in payments if p.status in TAKEN_MONEY]
        assert len(live) <= 1, (where, payments)
        assert [p.provider_reference for p in live] == [i["id"] for i in succeeded], (
            where,
            "our payments and the provider disagree on what was charged",
            payments,
            succeeded,
        )
        db_refunded = sum((p.amount_refunded for p in live), Decimal(0))
        assert refunded == minor_units(db_refunded), (where, refunded, db_refunded)
        if status == "PAID":
            assert captured == minor_units(total), (where, captured, total)
            assert live[0].status in ("SUCCEEDED", "PARTIALLY_REFUNDED"), (where, live)
            assert refunded < captured, (where, refunded, captured)
        elif status == "REFUNDED" or (status == "CANCELLED" and live):
            assert captured == refunded == minor_units(total), (where, captured, refunded)
            assert live[0].status == "REFUNDED", (where, live)
        else:  # PENDING_PAYMENT, EXPIRED, CANCELLED before any payment succeeded
            assert status in ("PENDING_PAYMENT", "EXPIRED", "CANCELLED"), where
            assert captured == 0, (where, "money taken for an order that is not paid", succeeded)

    def _assert_stock_accounted(self) -> None:
        for product_id, initial in self.initial_stock.items():
            [(stock, held)] = query(
                self.stack.database_url,
                "SELECT p.stock, (SELECT coalesce(sum(l.quantity), 0) FROM order_lines l"
                "   JOIN orders o ON o.id = l.order_id"
                "  WHERE l.product_id = p.id AND o.status = ANY(%s))"
                " FROM products p WHERE p.id = %s",
                list(HOLDS_STOCK),
                product_id,
            )
            assert stock + held == initial, (product_id, "stock", stock, "held", held, initial)


# --- webhooks ------------------------------------------------------------------------------


def stripe_signature(payload: bytes, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    """A `Stripe-Signature` header as Stripe computes it: HMAC-SHA256 over "<t>.<body>"."""
    timestamp = int(time.time()) if at is None else at
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


async def localstripe_event(stack: Stack, event_type: str, intent_id: str) -> dict[str, Any] | None:
    """The event localstripe made of `intent_id` reaching `event_type`, as it delivers it."""
    params: dict[str, str | int] = {"type": event_type, "limit": 100}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.localstripe_port}",
        headers={"Authorization": f"Bearer {LOCALSTRIPE_API_KEY}"},
        timeout=10,
    ) as client:
        while True:
            reply = await client.get("/v1/events", params=params)
            reply.raise_for_status()
            page = reply.json()
            for event in page["data"]:
                if event["data"]["object"]["id"] == intent_id:
                    found: dict[str, Any] = event
                    return found
            if not page["has_more"] or not page["data"]:
                return None
            params["starting_after"] = page["data"][-1]["id"]


@contextlib.asynccontextmanager
async def localstripe_webhooks_lost(stack: Stack) -> AsyncIterator[None]:
    """localstripe delivers its events to a port nobody listens on while this is open, as if
    every delivery were lost, so only what the test does (or the reconciler) can settle a
    payment. Its deliveries leave one second after the event and read the endpoint then."""
    register_localstripe_webhook(
        stack.localstripe_port, f"http://127.0.0.1:{free_port()}{WEBHOOK_PATH}", WEBHOOK_SECRET
    )
    try:
        yield
    finally:
        register_localstripe_webhook(
            stack.localstripe_port, f"{stack.rest_base}{WEBHOOK_PATH}", WEBHOOK_SECRET
        )
