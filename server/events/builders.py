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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.message import Message
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


def money(value: Money) -> money_pb2.Money:
    units, nanos = value.units_nanos()
    return money_pb2.Money(currency_code=value.currency, units=units, nanos=nanos)


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _event(
    message_type: Callable[..., Message],
    event_type: str,
    *,
    aggregate_type: str,
    aggregate_id: str,
    sequence: int,
    occur_time: datetime,
    **fields: Any,
) -> OutboxEvent:
    if sequence < 1:
        raise ValueError(f"{event_type} of {aggregate_id}: sequence {sequence}, must start at 1")
    event_id = uuid.uuid4()
    metadata = events_pb2.EventMetadata(
        event_id=str(event_id),
        event_type=event_type,
        aggregate_id=aggregate_id,
        sequence=sequence,
        occur_time=timestamp(occur_time),
    )
    message = message_type(metadata=metadata, **fields)
    return OutboxEvent(
        event_id=event_id,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        sequence=sequence,
        subject=SUBJECT_PREFIX + event_type,
        type_name=message.DESCRIPTOR.full_name,
        payload=message.SerializeToString(),
    )


def _order_lines(lines: Iterable[OrderLine]) -> list[events_pb2.OrderLine]:
    return [
        events_pb2.OrderLine(
            product_id=line.product_id,
            sku=line.sku,
            quantity=line.quantity,
            unit_price=money(line.unit_price),
        )
        for line in lines
    ]


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
    return _event(
        events_pb2.OrderCreated,
        "order.created",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=ORDER_CREATED_SEQUENCE,
        occur_time=occur_time,
        order_id=order_id,
        customer_id=customer_id,
        lines=_order_lines(lines),
        total=money(total),
        expire_time=timestamp(expire_time),
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
    return _event(
        events_pb2.OrderPaid,
        "order.paid",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=sequence,
        occur_time=occur_time,
        order_id=order_id,
        customer_id=customer_id,
        payment_id=payment_id,
        amount=money(amount),
    )


def order_cancelled(
    *, order_id: str, customer_id: str, was_paid: bool, sequence: int, occur_time: datetime
) -> OutboxEvent:
    return _event(
        events_pb2.OrderCancelled,
        "order.cancelled",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=sequence,
        occur_time=occur_time,
        order_id=order_id,
        customer_id=customer_id,
        was_paid=was_paid,
    )


def order_expired(
    *, order_id: str, customer_id: str, sequence: int, occur_time: datetime
) -> OutboxEvent:
    return _event(
        events_pb2.OrderExpired,
        "order.expired",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=sequence,
        occur_time=occur_time,
        order_id=order_id,
        customer_id=customer_id,
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
    return _event(
        events_pb2.OrderRefunded,
        "order.refunded",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=sequence,
        occur_time=occur_time,
        order_id=order_id,
        customer_id=customer_id,
        payment_id=payment_id,
        amount_refunded=money(amount_refunded),
        was_shipped=was_shipped,
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
    return _event(
        events_pb2.OrderShipped,
        "order.shipped",
        aggregate_type="order",
        aggregate_id=order_id,
        sequence=sequence,
        occur_time=occur_time,
        order_id=order_id,
        customer_id=customer_id,
        shipment_id=shipment_id,
        warehouse=warehouse,
        lines=[
            events_pb2.ShippedLine(product_id=line.product_id, sku=line.sku, quantity=line.quantity)
            for line in lines
        ],
    )


def fulfilment_requested(
    *, order_id: str, customer_id: str, lines: Sequence[OrderLine], occur_time: datetime
) -> OutboxEvent:
    return _event(
        events_pb2.FulfilmentRequested,
        "fulfilment.requested",
        aggregate_type="fulfilment",
        aggregate_id=order_id,
        sequence=FULFILMENT_REQUESTED_SEQUENCE,
        occur_time=occur_time,
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


# --- payments --------------------------------------------------------------------------------


def payment_succeeded(payment: Payment, *, sequence: int, occur_time: datetime) -> OutboxEvent:
    return _event(
        events_pb2.PaymentSucceeded,
        "payment.succeeded",
        aggregate_type="payment",
        aggregate_id=payment.id,
        sequence=sequence,
        occur_time=occur_time,
        payment_id=payment.id,
        order_id=payment.order_id,
        customer_id=payment.customer_id,
        amount=money(payment.amount),
        provider=payment.provider,
        provider_reference=payment.provider_reference,
    )


def payment_failed(
    payment: Payment,
    *,
    failure_code: str,
    failure_message: str,
    sequence: int,
    occur_time: datetime,
) -> OutboxEvent:
    return _event(
        events_pb2.PaymentFailed,
        "payment.failed",
        aggregate_type="payment",
        aggregate_id=payment.id,
        sequence=sequence,
        occur_time=occur_time,
        payment_id=payment.id,
        order_id=payment.order_id,
        customer_id=payment.customer_id,
        amount=money(payment.amount),
        failure_code=failure_code,
        failure_message=failure_message,
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
    return _event(
        events_pb2.PaymentRefunded,
        "payment.refunded",
        aggregate_type="payment",
        aggregate_id=payment.id,
        sequence=sequence,
        occur_time=occur_time,
        payment_id=payment.id,
        order_id=payment.order_id,
        customer_id=payment.customer_id,
        refund_id=refund_id,
        amount=money(amount),
        total_refunded=money(total),
        fully_refunded=total.amount >= payment.amount.amount,
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
    return _event(
        events_pb2.StockChanged,
        "inventory.stock_changed",
        aggregate_type="inventory",
        aggregate_id=product_id,
        sequence=sequence,
        occur_time=occur_time,
        product_id=product_id,
        sku=sku,
        stock=stock,
        delta=delta,
        cause=cause.value,
        order_ids=list(order_ids),
        adjustment_id=adjustment_id,
        shipment_id=shipment_id,
        warehouse=warehouse,
    )
