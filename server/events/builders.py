"""Events from domain changes: one function per event type, each returning the OutboxEvent
to append (protos/marketplace/events/v1/events.proto is the contract). Plain Python: the
caller passes what changed, the aggregate's new sequence number and the change's time (both
from the UPDATE that made it, see server/events/outbox.py).

Subjects are `marketplace.<event_type>`; the aggregate type is the event type's first part,
except that a product's stock is the `inventory` aggregate and an order's fulfilment the
`fulfilment` one (aggregate id: the order id).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from google.type import money_pb2

from marketplace.events.v1 import events_pb2
from server.domain.money import Money
from server.domain.orders import OrderLine
from server.domain.payments import Payment
from server.events.outbox import OutboxEvent

SUBJECT_PREFIX = "marketplace."
# An order's first event, written by the transaction that creates it.
ORDER_CREATED_SEQUENCE = 1
# A product's first event, written by the transaction that creates it.
PRODUCT_CREATED_SEQUENCE = 1
# An order's fulfilment has one event today, written when the order is paid.
FULFILMENT_REQUESTED_SEQUENCE = 1


class StockChangeCause(enum.IntEnum):
    """Why a product's sellable stock changed (the proto's StockChangeCause)."""

    ORDER_PLACED = events_pb2.STOCK_CHANGE_CAUSE_ORDER_PLACED
    ORDER_RELEASED = events_pb2.STOCK_CHANGE_CAUSE_ORDER_RELEASED
    ADJUSTED = events_pb2.STOCK_CHANGE_CAUSE_ADJUSTED
    PRODUCT_CREATED = events_pb2.STOCK_CHANGE_CAUSE_PRODUCT_CREATED
    WAREHOUSE_LEVEL = events_pb2.STOCK_CHANGE_CAUSE_WAREHOUSE_LEVEL
    SHIPMENT = events_pb2.STOCK_CHANGE_CAUSE_SHIPMENT


@dataclass(frozen=True, slots=True)
class ShippedUnits:
    """Units of one product a shipment carried."""

    product_id: str
    sku: str
    quantity: int


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Every event message: each has its EventMetadata in field 1.
_Event = (
    events_pb2.OrderCreated
    | events_pb2.OrderPaid
    | events_pb2.OrderCancelled
    | events_pb2.OrderExpired
    | events_pb2.OrderRefunded
    | events_pb2.OrderShipped
    | events_pb2.PaymentSucceeded
    | events_pb2.PaymentFailed
    | events_pb2.PaymentRefunded
    | events_pb2.StockChanged
    | events_pb2.FulfilmentRequested
)


def set_money(target: money_pb2.Money, value: Money) -> None:
    target.currency_code = value.currency
    target.units, target.nanos = value.units_nanos()


def set_timestamp(target: Timestamp, moment: datetime) -> None:
    """Timestamp.FromDatetime's result, cheaper (the order transaction builds several per
    order; docs/benchmarks.md): whole seconds and nanoseconds since the epoch, for an aware
    time."""
    since = moment - _EPOCH
    target.seconds = since.days * 86_400 + since.seconds
    target.nanos = since.microseconds * 1_000


def _outbox_event(
    message: _Event,
    event_type: str,
    *,
    aggregate_type: str,
    aggregate_id: str,
    sequence: int,
    occur_time: datetime,
) -> OutboxEvent:
    """Fills `message`'s metadata and serializes it. Messages are filled by assignment,
    not keyword arguments, which cost more in upb on the order transaction
    (docs/benchmarks.md)."""
    if sequence < 1:
        raise ValueError(f"{event_type} of {aggregate_id}: sequence {sequence}, must start at 1")
    event_id = uuid.uuid4()
    metadata = message.metadata
    metadata.event_id = str(event_id)
    metadata.event_type = event_type
    metadata.aggregate_id = aggregate_id
    metadata.sequence = sequence
    set_timestamp(metadata.occur_time, occur_time)
    return OutboxEvent(
        event_id=event_id,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        sequence=sequence,
        subject=SUBJECT_PREFIX + event_type,
        type_name=message.DESCRIPTOR.full_name,
        payload=message.SerializeToString(),
    )


def _add_order_lines(target: Any, lines: Iterable[OrderLine]) -> None:
    for line in lines:
        added = target.add()
        added.product_id = line.product_id
        added.sku = line.sku
        added.quantity = line.quantity
        set_money(added.unit_price, line.unit_price)


# --- orders ----------------------------------------------------------------------------------


def order_created(
    *,
    order_id: str,
    customer_id: str,
    lines: Sequence[OrderLine],
    total: Money,
    expire_time: datetime,
    occur_time: datetime,
) -> OutboxEvent:
    message = events_pb2.OrderCreated(order_id=order_id, customer_id=customer_id)
    _add_order_lines(message.lines, lines)
    set_money(message.total, total)
    set_timestamp(message.expire_time, expire_time)
    return _outbox_event(
        message,
        "order.created",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=ORDER_CREATED_SEQUENCE,
        occur_time=occur_time,
    )


def order_paid(
    *,
    order_id: str,
    customer_id: str,
    payment_id: str,
    amount: Money,
    sequence: int,
    occur_time: datetime,
) -> OutboxEvent:
    message = events_pb2.OrderPaid(
        order_id=order_id, customer_id=customer_id, payment_id=payment_id
    )
    set_money(message.amount, amount)
    return _outbox_event(
        message,
        "order.paid",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=sequence,
        occur_time=occur_time,
    )


def order_cancelled(
    *, order_id: str, customer_id: str, was_paid: bool, sequence: int, occur_time: datetime
) -> OutboxEvent:
    message = events_pb2.OrderCancelled(
        order_id=order_id, customer_id=customer_id, was_paid=was_paid
    )
    return _outbox_event(
        message,
        "order.cancelled",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=sequence,
        occur_time=occur_time,
    )


def order_expired(
    *, order_id: str, customer_id: str, sequence: int, occur_time: datetime
) -> OutboxEvent:
    message = events_pb2.OrderExpired(order_id=order_id, customer_id=customer_id)
    return _outbox_event(
        message,
        "order.expired",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=sequence,
        occur_time=occur_time,
    )


def order_refunded(
    *,
    order_id: str,
    customer_id: str,
    payment_id: str,
    amount_refunded: Money,
    was_shipped: bool,
    sequence: int,
    occur_time: datetime,
) -> OutboxEvent:
    message = events_pb2.OrderRefunded(
        order_id=order_id, customer_id=customer_id, payment_id=payment_id, was_shipped=was_shipped
    )
    set_money(message.amount_refunded, amount_refunded)
    return _outbox_event(
        message,
        "order.refunded",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=sequence,
        occur_time=occur_time,
    )


def order_shipped(
    *,
    order_id: str,
    customer_id: str,
    shipment_id: str,
    warehouse: str,
    lines: Sequence[ShippedUnits],
    sequence: int,
    occur_time: datetime,
) -> OutboxEvent:
    """For the warehouse's shipment (the order's status UPDATE bumps its event_sequence)."""
    message = events_pb2.OrderShipped(
        order_id=order_id,
        customer_id=customer_id,
        shipment_id=shipment_id,
        warehouse=warehouse,
        lines=[
            events_pb2.ShippedLine(product_id=line.product_id, sku=line.sku, quantity=line.quantity)
            for line in lines
        ],
    )
    return _outbox_event(
        message,
        "order.shipped",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=sequence,
        occur_time=occur_time,
    )


def fulfilment_requested(
    *, order_id: str, customer_id: str, lines: Sequence[OrderLine], occur_time: datetime
) -> OutboxEvent:
    message = events_pb2.FulfilmentRequested(
        order_id=order_id,
        customer_id=customer_id,
        lines=[
            events_pb2.FulfilmentLine(
                product_id=line.product_id, sku=line.sku, quantity=line.quantity
            )
            for line in lines
        ],
        shipping=events_pb2.ShippingDetails(),
    )
    return _outbox_event(
        message,
        "fulfilment.requested",
        aggregate_type="fulfilment",
        aggregate_id=order_id,
        sequence=FULFILMENT_REQUESTED_SEQUENCE,
        occur_time=occur_time,
    )


# --- payments --------------------------------------------------------------------------------


def payment_succeeded(payment: Payment, *, sequence: int, occur_time: datetime) -> OutboxEvent:
    message = events_pb2.PaymentSucceeded(
        payment_id=payment.id,
        order_id=payment.order_id,
        customer_id=payment.customer_id,
        provider=payment.provider,
        provider_reference=payment.provider_reference,
    )
    set_money(message.amount, payment.amount)
    return _outbox_event(
        message,
        "payment.succeeded",
        aggregate_type="payment",
        aggregate_id=payment.id,
        sequence=sequence,
        occur_time=occur_time,
    )


def payment_failed(
    payment: Payment,
    *,
    failure_code: str,
    failure_message: str,
    sequence: int,
    occur_time: datetime,
) -> OutboxEvent:
    message = events_pb2.PaymentFailed(
        payment_id=payment.id,
        order_id=payment.order_id,
        customer_id=payment.customer_id,
        failure_code=failure_code,
        failure_message=failure_message,
    )
    set_money(message.amount, payment.amount)
    return _outbox_event(
        message,
        "payment.failed",
        aggregate_type="payment",
        aggregate_id=payment.id,
        sequence=sequence,
        occur_time=occur_time,
    )


def payment_refunded(
    payment: Payment,
    *,
    refund_id: str,
    amount: Money,
    sequence: int,
    occur_time: datetime,
) -> OutboxEvent:
    """`payment` as it was before this refund was added to it."""
    total = Money(amount.currency, payment.amount_refunded.amount + amount.amount)
    message = events_pb2.PaymentRefunded(
        payment_id=payment.id,
        order_id=payment.order_id,
        customer_id=payment.customer_id,
        refund_id=refund_id,
        fully_refunded=total.amount >= payment.amount.amount,
    )
    set_money(message.amount, amount)
    set_money(message.total_refunded, total)
    return _outbox_event(
        message,
        "payment.refunded",
        aggregate_type="payment",
        aggregate_id=payment.id,
        sequence=sequence,
        occur_time=occur_time,
    )


# --- inventory -------------------------------------------------------------------------------


def stock_changed(
    *,
    product_id: str,
    sku: str,
    stock: int,
    delta: int,
    cause: StockChangeCause,
    sequence: int,
    occur_time: datetime,
    order_ids: Iterable[str] = (),
    adjustment_id: str = "",
    shipment_id: str = "",
    warehouse: str = "",
) -> OutboxEvent:
    """`stock`: the product's sellable units after the change; `delta`: the change. The
    product's stock UPDATE bumps its event_sequence."""
    message = events_pb2.StockChanged()
    message.product_id = product_id
    message.sku = sku
    message.stock = stock
    message.delta = delta
    message.cause = cause.value
    message.order_ids.extend(order_ids)
    if adjustment_id:
        message.adjustment_id = adjustment_id
    if shipment_id:
        message.shipment_id = shipment_id
    if warehouse:
        message.warehouse = warehouse
    return _outbox_event(
        message,
        "inventory.stock_changed",
        aggregate_type="inventory",
        aggregate_id=product_id,
        sequence=sequence,
        occur_time=occur_time,
    )
