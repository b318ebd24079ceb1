"""Every use case writes its events in its own transaction, on a real PostgreSQL: each event
once per change, numbered 1, 2, 3... per aggregate in commit order, none for a refused
change, none at all with OUTBOX_WRITES off. The payment provider is an in-memory fake: what
it answers is not under test here."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncEngine

from marketplace.events.v1 import events_pb2
from server.db.driver import DriverPool
from server.domain.catalog import PriceInput, new_product, product_changes, stock_adjustment
from server.domain.errors import FailedPrecondition, OutOfStock
from server.domain.identity import Customer, Principal, Role
from server.domain.money import Money
from server.domain.orders import OrderStatus, cancel_request, order_request
from server.domain.payments import PaymentStatus, RefundStatus, payment_request, refund_request
from server.services.circuit import GuardedProvider
from server.services.providers import (
    CardDeclined,
    IntentStatus,
    PaymentUnknownToProvider,
    ProviderIntent,
    ProviderRefund,
)
from server.services.use_cases import UseCases
from tests.conftest import insert_product, stock_of
from tests.use_cases import wired

pytestmark = pytest.mark.integration

ADMIN = Principal("root", frozenset({Role.ADMIN}))
GOOD_CARD = "pm_card_visa"
DECLINED_CARD = "pm_card_chargeDeclined"


class FakeProvider:
    """Charges every card but DECLINED_CARD; refunds at once."""

    name = "fake"

    def __init__(self) -> None:
        self._intents: dict[str, ProviderIntent] = {}
        self._methods: dict[str, str] = {}
        self._refunds: dict[str, list[ProviderRefund]] = {}

    async def create_intent(
        self,
        *,
        amount_minor: int,
        currency: str,
        payment_method: str,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> ProviderIntent:
        reference = f"pi_{uuid.uuid4().hex}"
        intent = ProviderIntent(
            reference, IntentStatus.REQUIRES_CONFIRMATION, amount_minor, currency
        )
        self._intents[reference] = intent
        self._methods[reference] = payment_method
        return intent

    async def confirm_intent(self, reference: str, *, idempotency_key: str) -> ProviderIntent:
        intent = self._intents[reference]
        if self._methods[reference] == DECLINED_CARD:
            self._intents[reference] = ProviderIntent(
                reference, IntentStatus.FAILED, intent.amount_minor, intent.currency
            )
            raise CardDeclined("card_declined", "Your card was declined.")
        self._intents[reference] = ProviderIntent(
            reference, IntentStatus.SUCCEEDED, intent.amount_minor, intent.currency
        )
        return self._intents[reference]

    async def retrieve_intent(self, reference: str) -> ProviderIntent:
        if reference not in self._intents:
            raise PaymentUnknownToProvider(reference, "no such payment_intent", 404)
        return self._intents[reference]

    async def cancel_intent(self, reference: str, *, idempotency_key: str) -> ProviderIntent:
        return self._intents[reference]

    async def refund(
        self,
        intent_reference: str,
        *,
        amount_minor: int,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> ProviderRefund:
        made = ProviderRefund(
            f"re_{uuid.uuid4().hex}",
            intent_reference,
            amount_minor,
            RefundStatus.SUCCEEDED,
            dict(metadata),
        )
        self._refunds.setdefault(intent_reference, []).append(made)
        return made

    async def list_refunds(self, intent_reference: str) -> list[ProviderRefund]:
        return list(self._refunds.get(intent_reference, []))


@dataclass(frozen=True)
class Written:
    """An outbox row, its payload decoded."""

    position: int
    aggregate_type: str
    aggregate_id: str
    sequence: int
    subject: str
    message: Any


def events_of(database_url: str, *aggregate_ids: str) -> list[Written]:
    """The outbox rows of these aggregates (orders, payments, products), oldest first."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """
            SELECT position, aggregate_type, aggregate_id, sequence, subject, type_name,
                   payload
              FROM outbox WHERE aggregate_id = ANY(%s) ORDER BY position
            """,
            (list(aggregate_ids),),
        ).fetchall()
    written = []
    for position, aggregate_type, aggregate_id, sequence, subject, type_name, payload in rows:
        message: Message = getattr(events_pb2, type_name.rsplit(".", 1)[1])()
        message.ParseFromString(payload)
        assert type_name == message.DESCRIPTOR.full_name
        metadata = message.metadata  # type: ignore[attr-defined]
        assert (metadata.aggregate_id, metadata.sequence) == (aggregate_id, sequence)
        assert subject == "marketplace." + metadata.event_type
        written.append(Written(position, aggregate_type, aggregate_id, sequence, subject, message))
    return written


def sequence_of(written: list[Written]) -> list[tuple[str, str, int]]:
    """(subject's event, aggregate type, sequence) in the order written."""
    return [(w.subject.removeprefix("marketplace."), w.aggregate_type, w.sequence) for w in written]


def outbox_size(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    assert row is not None
    count: int = row[0]
    return count


def customer() -> Principal:
    return Principal(f"ev-{uuid.uuid4().hex[:8]}", frozenset({Role.CUSTOMER}), "ev@example.com")


@pytest.fixture
def provider() -> GuardedProvider:
    return GuardedProvider(FakeProvider(), threshold=3, reset_seconds=1)


@pytest.fixture
def shop(engine: AsyncEngine, hot_path: DriverPool, provider: GuardedProvider) -> UseCases:
    return wired(engine, hot_path, provider)


async def pay(shop: UseCases, buyer: Principal, order_id: str, card: str = GOOD_CARD) -> Any:
    return await shop.charging.create_payment(
        buyer, payment_request(order_id, f"pay-{uuid.uuid4()}", card)
    )


async def test_an_order_created_paid_and_refunded_numbers_its_events_1_2_3(
    shop: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=10, price="12.50")
    buyer = customer()
    order = await shop.placement.place_order(
        buyer.subject, order_request("r-1", [(product, 2)]), customer_email=buyer.email
    )
    payment = await pay(shop, buyer, order.id)
    assert payment.status is PaymentStatus.SUCCEEDED
    await shop.refunds.refund_payment(ADMIN, refund_request(payment.id, "ref-1", None, [], ""))

    written = events_of(database_url, order.id, payment.id, product)
    assert sorted(sequence_of(written)) == sorted(
        [
            ("order.created", "order", 1),
            ("inventory.stock_changed", "inventory", 1),
            ("payment.succeeded", "payment", 1),
            ("order.paid", "order", 2),
            ("fulfilment.requested", "fulfilment", 1),
            ("payment.refunded", "payment", 2),
            ("order.refunded", "order", 3),
            ("inventory.stock_changed", "inventory", 2),
        ]
    )
    by_subject = {w.subject: w.message for w in written if w.aggregate_type != "inventory"}
    created = by_subject["marketplace.order.created"]
    assert (created.customer_id, created.total.units, created.total.nanos) == (
        buyer.subject,
        25,
        0,
    )
    assert [(line.product_id, line.quantity) for line in created.lines] == [(product, 2)]
    assert created.expire_time.ToDatetime(tzinfo=order.expire_time.tzinfo) == order.expire_time
    assert created.metadata.occur_time.ToDatetime(tzinfo=order.create_time.tzinfo) == (
        order.create_time
    )
    assert by_subject["marketplace.order.paid"].payment_id == payment.id
    assert by_subject["marketplace.payment.succeeded"].provider_reference.startswith("pi_")
    fulfilment = by_subject["marketplace.fulfilment.requested"]
    assert [(line.sku, line.quantity) for line in fulfilment.lines] == [(order.lines[0].sku, 2)]
    refunded = by_subject["marketplace.payment.refunded"]
    assert (refunded.amount.units, refunded.total_refunded.units, refunded.fully_refunded) == (
        25,
        25,
        True,
    )
    assert by_subject["marketplace.order.refunded"].amount_refunded.units == 25
    placed, released = (w.message for w in written if w.aggregate_type == "inventory")
    assert (placed.stock, placed.delta, placed.cause, list(placed.order_ids)) == (
        8,
        -2,
        events_pb2.STOCK_CHANGE_CAUSE_ORDER_PLACED,
        [order.id],
    )
    assert (released.stock, released.delta, released.cause) == (
        10,
        2,
        events_pb2.STOCK_CHANGE_CAUSE_ORDER_RELEASED,
    )
    # Commit order per aggregate is position order.
    for aggregate in {(w.aggregate_type, w.aggregate_id) for w in written}:
        mine = [w.sequence for w in written if (w.aggregate_type, w.aggregate_id) == aggregate]
        assert mine == list(range(1, len(mine) + 1))
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT customer_email FROM orders WHERE id = %s", (order.id,)
        ).fetchone()
    assert stored == ("ev@example.com",)


async def test_a_partial_refund_is_a_payment_event_only(shop: UseCases, database_url: str) -> None:
    product = insert_product(database_url, stock=10, price="12.50")
    buyer = customer()
    order = await shop.placement.place_order(buyer.subject, order_request("r-1", [(product, 2)]))
    payment = await pay(shop, buyer, order.id)
    part = Money("USD", Decimal("5.00"))
    await shop.refunds.refund_payment(ADMIN, refund_request(payment.id, "part", part, [], ""))
    await shop.refunds.refund_payment(ADMIN, refund_request(payment.id, "rest", None, [], ""))
    written = events_of(database_url, payment.id, order.id)
    refunds = [w.message for w in written if w.subject == "marketplace.payment.refunded"]
    assert [(r.metadata.sequence, r.amount.units, r.total_refunded.units) for r in refunds] == [
        (2, 5, 5),
        (3, 20, 25),
    ]
    assert [r.fully_refunded for r in refunds] == [False, True]
    assert [w.sequence for w in written if w.subject == "marketplace.order.refunded"] == [3]


async def test_cancelling_a_pending_order_releases_its_stock_with_events(
    shop: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=5)
    buyer = customer()
    order = await shop.placement.place_order(buyer.subject, order_request("r-1", [(product, 3)]))
    await shop.cancellation.cancel_order(buyer, cancel_request(order.id, "c-1"))
    await shop.cancellation.cancel_order(buyer, cancel_request(order.id, "c-1"))  # a retry
    written = events_of(database_url, order.id, product)
    assert sequence_of(written)[2:] == [
        ("order.cancelled", "order", 2),
        ("inventory.stock_changed", "inventory", 2),
    ]
    cancelled, released = written[2].message, written[3].message
    assert cancelled.was_paid is False
    assert (released.stock, released.delta, list(released.order_ids)) == (5, 3, [order.id])


async def test_cancelling_a_paid_order_refunds_then_cancels_with_events(
    shop: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=5)
    buyer = customer()
    order = await shop.placement.place_order(buyer.subject, order_request("r-1", [(product, 1)]))
    payment = await pay(shop, buyer, order.id)
    cancelled = await shop.cancellation.cancel_order(buyer, cancel_request(order.id, "c-1"))
    assert cancelled.status is OrderStatus.CANCELLED
    written = events_of(database_url, order.id, payment.id, product)
    assert sequence_of(written)[-3:] == [
        ("payment.refunded", "payment", 2),
        ("order.cancelled", "order", 3),
        ("inventory.stock_changed", "inventory", 2),
    ]
    assert written[-2].message.was_paid is True


async def test_a_declined_payment_fails_with_an_event_and_a_second_one_pays(
    shop: UseCases, database_url: str
) -> None:
    product = insert_product(database_url, stock=5)
    buyer = customer()
    order = await shop.placement.place_order(buyer.subject, order_request("r-1", [(product, 1)]))
    declined = await pay(shop, buyer, order.id, DECLINED_CARD)
    assert declined.status is PaymentStatus.FAILED
    paid = await pay(shop, buyer, order.id)
    written = events_of(database_url, order.id, declined.id, paid.id)
    assert sorted(sequence_of(written)) == sorted(
        [
            ("order.created", "order", 1),
            ("payment.failed", "payment", 1),
            ("payment.succeeded", "payment", 1),
            ("order.paid", "order", 2),
            ("fulfilment.requested", "fulfilment", 1),
        ]
    )
    [failed] = [w.message for w in written if w.subject == "marketplace.payment.failed"]
    assert (failed.payment_id, failed.failure_code) == (declined.id, "card_declined")


async def test_expiry_writes_one_stock_change_per_product_for_the_whole_sweep(
    engine: AsyncEngine, hot_path: DriverPool, database_url: str
) -> None:
    hot = insert_product(database_url, stock=10)
    quick = wired(engine, hot_path, payment_window_seconds=0.012345)
    orders = [
        await quick.placement.place_order(f"exp-{n}", order_request(f"exp-{n}", [(hot, 1)]))
        for n in range(3)
    ]
    await asyncio.sleep(0.05)
    while await quick.upkeep.expire_orders():
        pass
    ids = [order.id for order in orders]
    written = events_of(database_url, hot, *ids)
    # The event's deadline, computed in Python, is the one the database stored.
    created = {w.aggregate_id: w.message for w in written if w.subject.endswith("created")}
    for order in orders:
        deadline = created[order.id].expire_time.ToDatetime(tzinfo=order.expire_time.tzinfo)
        assert deadline == order.expire_time
    expired = [w for w in written if w.subject == "marketplace.order.expired"]
    assert sorted((w.aggregate_id, w.sequence) for w in expired) == sorted((i, 2) for i in ids)
    stock = [w for w in written if w.aggregate_type == "inventory"]
    assert [w.sequence for w in stock] == [1, 2, 3, 4]
    release = stock[-1].message
    assert (release.stock, release.delta, sorted(release.order_ids)) == (10, 3, sorted(ids))
    assert stock_of(database_url, hot) == 10


async def test_catalog_changes_of_stock_are_events_and_others_are_not(
    shop: UseCases, database_url: str
) -> None:
    draft = new_product(
        sku=f"EV-{uuid.uuid4().hex[:8]}",
        name="Lamp",
        description="",
        price=PriceInput("EUR", 20, 0),
        stock=4,
    )
    product = await shop.catalog.create_product(draft)
    adjustment = stock_adjustment(product.id, 6, "delivery", "adj-1")
    await shop.catalog.adjust_stock("root", adjustment)
    await shop.catalog.adjust_stock("root", adjustment)  # a retry moves nothing
    with pytest.raises(FailedPrecondition):
        await shop.catalog.adjust_stock("root", stock_adjustment(product.id, -11, "", "adj-2"))
    renamed = product_changes(["name"], sku="", name="Desk lamp", description="", price=None)
    await shop.catalog.update_product(product.id, renamed)
    await shop.placement.place_order("buyer", order_request("r-1", [(product.id, 1)]))

    written = events_of(database_url, product.id)
    assert [(w.sequence, w.message.cause, w.message.stock, w.message.delta) for w in written] == [
        (1, events_pb2.STOCK_CHANGE_CAUSE_PRODUCT_CREATED, 4, 4),
        (2, events_pb2.STOCK_CHANGE_CAUSE_ADJUSTED, 10, 6),
        (3, events_pb2.STOCK_CHANGE_CAUSE_ORDER_PLACED, 9, -1),
    ]
    assert uuid.UUID(written[1].message.adjustment_id)
    assert written[0].message.sku == draft.sku


async def test_refused_and_replayed_orders_write_nothing(shop: UseCases, database_url: str) -> None:
    product = insert_product(database_url, stock=2)
    buyer = customer()
    outcomes = await shop.placement.place_orders(
        [
            (buyer.customer, order_request("big", [(product, 3)])),  # short
            (buyer.customer, order_request("fits", [(product, 2)])),
            (buyer.customer, order_request("late", [(product, 1)])),  # nothing left
        ]
    )
    assert [type(o).__name__ for o in outcomes] == ["OutOfStock", "Order", "OutOfStock"]
    before = outbox_size(database_url)
    again = await shop.placement.place_order(buyer.subject, order_request("fits", [(product, 2)]))
    assert again.id == outcomes[1].id  # type: ignore[union-attr]
    with pytest.raises(OutOfStock):
        await shop.placement.place_order(buyer.subject, order_request("more", [(product, 1)]))
    assert outbox_size(database_url) == before
    written = events_of(database_url, product)
    [change] = [w.message for w in written]
    assert (change.stock, change.delta, list(change.order_ids)) == (0, -2, [again.id])


async def test_a_batch_writes_one_stock_change_per_product_naming_its_orders(
    shop: UseCases, database_url: str
) -> None:
    hot, other = insert_product(database_url, stock=10), insert_product(database_url, stock=10)
    outcomes = await shop.placement.place_orders(
        [
            (Customer(f"b-{n}", None), order_request("r", [(hot, 1), (other, n + 1)]))
            for n in range(3)
        ]
    )
    ids = [o.id for o in outcomes]  # type: ignore[union-attr]
    written = events_of(database_url, hot, other, *ids)
    assert [w.aggregate_id for w in written if w.subject == "marketplace.order.created"] == ids
    changes = {w.aggregate_id: w.message for w in written if w.aggregate_type == "inventory"}
    assert (changes[hot].stock, changes[hot].delta, list(changes[hot].order_ids)) == (7, -3, ids)
    assert (changes[other].stock, changes[other].delta) == (4, -6)
    assert {w.sequence for w in written} == {1}


async def test_concurrent_orders_number_a_products_changes_in_commit_order(
    shop: UseCases, database_url: str
) -> None:
    hot = insert_product(database_url, stock=1_000)
    placed = await asyncio.gather(
        *(
            shop.placement.place_order(f"c-{n}", order_request(f"c-{n}", [(hot, 1 + n % 3)]))
            for n in range(40)
        )
    )
    written = [w for w in events_of(database_url, hot) if w.aggregate_type == "inventory"]
    # Position order (commit order under the row lock) is sequence order, without gaps,
    # and each change's stock is the one before it plus its delta.
    assert [w.sequence for w in written] == list(range(1, len(written) + 1))
    level = 1_000
    for w in written:
        level += w.message.delta
        assert w.message.stock == level
    assert level == stock_of(database_url, hot)
    assert sorted(i for w in written for i in w.message.order_ids) == sorted(o.id for o in placed)


async def test_outbox_writes_off_writes_no_events(
    engine: AsyncEngine, hot_path: DriverPool, provider: GuardedProvider, database_url: str
) -> None:
    quiet = wired(engine, hot_path, provider, outbox_writes=False)
    product = insert_product(database_url, stock=5)
    buyer = customer()
    before = outbox_size(database_url)
    order = await quiet.placement.place_order(
        buyer.subject, order_request("r-1", [(product, 1)]), customer_email=buyer.email
    )
    await quiet.catalog.adjust_stock("root", stock_adjustment(product, 1, "", "adj-off"))
    payment = await pay(quiet, buyer, order.id)
    await quiet.refunds.refund_payment(ADMIN, refund_request(payment.id, "ref", None, [], ""))
    other = await quiet.placement.place_order(buyer.subject, order_request("r-2", [(product, 1)]))
    await quiet.cancellation.cancel_order(buyer, cancel_request(other.id, ""))
    assert outbox_size(database_url) == before
    assert stock_of(database_url, product) == 6
