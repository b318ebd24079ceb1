"""Event builders: subject, type name, aggregate and a payload that decodes to what changed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar

import pytest
from google.protobuf.message import Message

from marketplace.events.v1 import events_pb2
from server.domain.money import Money
from server.domain.orders import OrderLine
from server.domain.payments import Payment, PaymentStatus
from server.events import builders
from server.events.builders import ShippedUnits, StockChangeCause
from server.events.outbox import OutboxEvent, insert_parameters

pytestmark = pytest.mark.unit
M = TypeVar("M", bound=Message)

AT = datetime(2026, 12, 6, 10, 30, 15, 123456, tzinfo=UTC)
ORDER = "6f1c2f0e-9a8b-4c1d-8e2f-3a4b5c6d7e8f"
PRODUCT = "00000000-0000-4000-8000-000000000001"
LINE = OrderLine(PRODUCT, "MUG-001", 2, Money("EUR", Decimal("12.50")))
PAYMENT = Payment(
    id="0b6f3f5e-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
    order_id=ORDER,
    customer_id="alice",
    status=PaymentStatus.SUCCEEDED,
    amount=Money("EUR", Decimal("25.00")),
    amount_refunded=Money("EUR", Decimal("10.00")),
    provider="stripe",
    provider_reference="pi_123",
    failure_code="",
    failure_message="",
    create_time=AT,
    update_time=AT,
)


def decoded(event: OutboxEvent, message_type: type[M]) -> M:
    assert event.type_name == message_type.DESCRIPTOR.full_name
    message = message_type()
    message.ParseFromString(event.payload)
    return message


def check_metadata(
    event: OutboxEvent,
    message: Message,
    *,
    event_type: str,
    aggregate_type: str,
    aggregate_id: str,
    sequence: int,
) -> None:
    metadata: events_pb2.EventMetadata = message.metadata  # type: ignore[attr-defined]
    assert event.subject == f"marketplace.{event_type}"
    assert (event.aggregate_type, event.aggregate_id, event.sequence) == (
        aggregate_type,
        aggregate_id,
        sequence,
    )
    assert metadata.event_id == str(event.event_id)
    assert uuid.UUID(metadata.event_id).version == 4
    assert (metadata.event_type, metadata.aggregate_id, metadata.sequence) == (
        event_type,
        aggregate_id,
        sequence,
    )
    assert metadata.occur_time.ToDatetime(tzinfo=UTC) == AT


def test_order_created_is_the_orders_first_event_with_its_lines_total_and_deadline() -> None:
    expiry = datetime(2026, 12, 6, 10, 45, 15, 123456, tzinfo=UTC)
    event = builders.order_created(
        order_id=ORDER,
        customer_id="alice",
        lines=[LINE],
        total=Money("EUR", Decimal("25.00")),
        expire_time=expiry,
        occur_time=AT,
    )
    created = decoded(event, events_pb2.OrderCreated)
    check_metadata(
        event,
        created,
        event_type="order.created",
        aggregate_type="order",
        aggregate_id=ORDER,
        sequence=1,
    )
    assert (created.order_id, created.customer_id) == (ORDER, "alice")
    [line] = created.lines
    assert (line.product_id, line.sku, line.quantity) == (PRODUCT, "MUG-001", 2)
    assert (line.unit_price.currency_code, line.unit_price.units, line.unit_price.nanos) == (
        "EUR",
        12,
        500_000_000,
    )
    assert (created.total.units, created.total.nanos) == (25, 0)
    assert created.expire_time.ToDatetime(tzinfo=UTC) == expiry


def test_order_status_events_carry_their_sequence() -> None:
    paid = builders.order_paid(
        order_id=ORDER,
        customer_id="alice",
        payment_id=PAYMENT.id,
        amount=PAYMENT.amount,
        sequence=2,
        occur_time=AT,
    )
    check_metadata(
        paid,
        decoded(paid, events_pb2.OrderPaid),
        event_type="order.paid",
        aggregate_type="order",
        aggregate_id=ORDER,
        sequence=2,
    )
    assert decoded(paid, events_pb2.OrderPaid).payment_id == PAYMENT.id
    cancelled = builders.order_cancelled(
        order_id=ORDER, customer_id="alice", was_paid=True, sequence=3, occur_time=AT
    )
    assert decoded(cancelled, events_pb2.OrderCancelled).was_paid
    assert cancelled.subject == "marketplace.order.cancelled"
    expired = builders.order_expired(order_id=ORDER, customer_id="alice", sequence=2, occur_time=AT)
    assert (expired.subject, expired.sequence) == ("marketplace.order.expired", 2)
    refunded = builders.order_refunded(
        order_id=ORDER,
        customer_id="alice",
        payment_id=PAYMENT.id,
        amount_refunded=PAYMENT.amount,
        was_shipped=False,
        sequence=3,
        occur_time=AT,
    )
    assert decoded(refunded, events_pb2.OrderRefunded).amount_refunded.units == 25


def test_order_shipped_for_the_warehouse() -> None:
    event = builders.order_shipped(
        order_id=ORDER,
        customer_id="alice",
        shipment_id="SHP-1",
        warehouse="main",
        lines=[ShippedUnits(PRODUCT, "MUG-001", 2)],
        sequence=3,
        occur_time=AT,
    )
    shipped = decoded(event, events_pb2.OrderShipped)
    check_metadata(
        event,
        shipped,
        event_type="order.shipped",
        aggregate_type="order",
        aggregate_id=ORDER,
        sequence=3,
    )
    assert (shipped.shipment_id, shipped.warehouse) == ("SHP-1", "main")
    assert [(line.sku, line.quantity) for line in shipped.lines] == [("MUG-001", 2)]


def test_fulfilment_requested_is_the_fulfilments_first_event_keyed_by_the_order() -> None:
    event = builders.fulfilment_requested(
        order_id=ORDER, customer_id="alice", lines=[LINE], occur_time=AT
    )
    requested = decoded(event, events_pb2.FulfilmentRequested)
    check_metadata(
        event,
        requested,
        event_type="fulfilment.requested",
        aggregate_type="fulfilment",
        aggregate_id=ORDER,
        sequence=1,
    )
    assert [(line.sku, line.quantity) for line in requested.lines] == [("MUG-001", 2)]
    assert requested.HasField("shipping")


def test_payment_events() -> None:
    succeeded = builders.payment_succeeded(PAYMENT, sequence=1, occur_time=AT)
    message = decoded(succeeded, events_pb2.PaymentSucceeded)
    check_metadata(
        succeeded,
        message,
        event_type="payment.succeeded",
        aggregate_type="payment",
        aggregate_id=PAYMENT.id,
        sequence=1,
    )
    assert (message.order_id, message.provider, message.provider_reference) == (
        ORDER,
        "stripe",
        "pi_123",
    )
    failed = builders.payment_failed(
        PAYMENT,
        failure_code="card_declined",
        failure_message="Your card was declined.",
        sequence=1,
        occur_time=AT,
    )
    assert decoded(failed, events_pb2.PaymentFailed).failure_code == "card_declined"


@pytest.mark.parametrize(
    ("amount", "total", "fully"), [(Decimal("5.00"), 15, False), (Decimal("15.00"), 25, True)]
)
def test_payment_refunded_adds_the_refund_to_what_was_refunded_before(
    amount: Decimal, total: int, fully: bool
) -> None:
    event = builders.payment_refunded(
        PAYMENT, refund_id="r-1", amount=Money("EUR", amount), sequence=2, occur_time=AT
    )
    refunded = decoded(event, events_pb2.PaymentRefunded)
    assert (refunded.refund_id, refunded.total_refunded.units) == ("r-1", total)
    assert refunded.fully_refunded is fully
    assert event.sequence == 2


def test_stock_changed_names_the_product_as_its_aggregate() -> None:
    event = builders.stock_changed(
        product_id=PRODUCT,
        sku="MUG-001",
        stock=7,
        delta=-3,
        cause=StockChangeCause.ORDER_PLACED,
        sequence=4,
        occur_time=AT,
        order_ids=[ORDER],
    )
    changed = decoded(event, events_pb2.StockChanged)
    check_metadata(
        event,
        changed,
        event_type="inventory.stock_changed",
        aggregate_type="inventory",
        aggregate_id=PRODUCT,
        sequence=4,
    )
    assert (changed.stock, changed.delta, changed.cause) == (
        7,
        -3,
        events_pb2.STOCK_CHANGE_CAUSE_ORDER_PLACED,
    )
    assert list(changed.order_ids) == [ORDER]


def test_every_cause_is_the_protos() -> None:
    proto_causes = {
        name.removeprefix("STOCK_CHANGE_CAUSE_")
        for name in events_pb2.StockChangeCause.keys()  # noqa: SIM118 (an enum wrapper)
        if name != "STOCK_CHANGE_CAUSE_UNSPECIFIED"
    }
    assert {cause.name for cause in StockChangeCause} == proto_causes


def test_a_sequence_starts_at_one() -> None:
    with pytest.raises(ValueError, match="must start at 1"):
        builders.order_expired(order_id=ORDER, customer_id="alice", sequence=0, occur_time=AT)


def test_each_event_has_its_own_id_and_insert_parameters_keep_their_order() -> None:
    events = [
        builders.order_expired(order_id=ORDER, customer_id="alice", sequence=n, occur_time=AT)
        for n in (2, 3)
    ]
    assert events[0].event_id != events[1].event_id
    params = insert_parameters(events)
    assert params["event_ids"] == [event.event_id for event in events]
    assert params["event_sequences"] == [2, 3]
    assert params["event_payloads"] == [event.payload for event in events]
    assert {len(values) for values in params.values()} == {2}
