"""Protobuf <-> domain conversions."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from google.type import money_pb2

from marketplace.catalog.v1 import catalog_pb2
from marketplace.order.v1 import order_pb2
from marketplace.payment.v1 import payment_pb2
from server.domain.catalog import PriceInput, Product
from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.inventory import InventorySource
from server.domain.money import Money, money_problems
from server.domain.orders import Order, OrderStatus
from server.domain.payments import Payment, PaymentStatus

_ORDER_STATUS = {
    OrderStatus.PENDING_PAYMENT: order_pb2.ORDER_STATUS_PENDING_PAYMENT,
    OrderStatus.PAID: order_pb2.ORDER_STATUS_PAID,
    OrderStatus.CANCELLED: order_pb2.ORDER_STATUS_CANCELLED,
    OrderStatus.EXPIRED: order_pb2.ORDER_STATUS_EXPIRED,
    OrderStatus.REFUNDED: order_pb2.ORDER_STATUS_REFUNDED,
    OrderStatus.SHIPPED: order_pb2.ORDER_STATUS_SHIPPED,
}
_PAYMENT_STATUS = {
    PaymentStatus.PENDING: payment_pb2.PAYMENT_STATUS_PENDING,
    PaymentStatus.SUCCEEDED: payment_pb2.PAYMENT_STATUS_SUCCEEDED,
    PaymentStatus.FAILED: payment_pb2.PAYMENT_STATUS_FAILED,
    PaymentStatus.REFUNDED: payment_pb2.PAYMENT_STATUS_REFUNDED,
    PaymentStatus.PARTIALLY_REFUNDED: payment_pb2.PAYMENT_STATUS_PARTIALLY_REFUNDED,
}

_INVENTORY_SOURCE = {
    InventorySource.MANAGED_HERE: catalog_pb2.INVENTORY_SOURCE_MANAGED_HERE,
    InventorySource.WAREHOUSE: catalog_pb2.INVENTORY_SOURCE_WAREHOUSE,
}
_INVENTORY_SOURCE_OF = {value: source for source, value in _INVENTORY_SOURCE.items()}


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def money(value: Money) -> money_pb2.Money:
    units, nanos = value.units_nanos()
    return money_pb2.Money(currency_code=value.currency, units=units, nanos=nanos)


def price_input(product: catalog_pb2.Product) -> PriceInput | None:
    if not product.HasField("price"):
        return None
    return PriceInput(product.price.currency_code, product.price.units, product.price.nanos)


def inventory_source(
    field: str, value: catalog_pb2.InventorySource.ValueType
) -> InventorySource | None:
    """None for INVENTORY_SOURCE_UNSPECIFIED (the domain says where one is needed); a
    number this server does not know (proto3 keeps them) is INVALID_ARGUMENT."""
    if value == catalog_pb2.INVENTORY_SOURCE_UNSPECIFIED:
        return None
    if value not in _INVENTORY_SOURCE_OF:
        raise InvalidArgument([FieldViolation(field, f"{value} is not an InventorySource")])
    return _INVENTORY_SOURCE_OF[value]


def product(value: Product) -> catalog_pb2.Product:
    return catalog_pb2.Product(
        id=value.id,
        sku=value.sku,
        name=value.name,
        description=value.description,
        price=money(value.price),
        stock=value.stock,
        create_time=timestamp(value.create_time),
        update_time=timestamp(value.update_time),
        inventory_source=_INVENTORY_SOURCE[value.inventory_source],
    )


def order(value: Order) -> order_pb2.Order:
    return order_pb2.Order(
        id=value.id,
        customer_id=value.customer_id,
        status=_ORDER_STATUS[value.status],
        items=[
            order_pb2.OrderItem(
                product_id=line.product_id,
                quantity=line.quantity,
                sku=line.sku,
                unit_price=money(line.unit_price),
                line_total=money(line.line_total),
            )
            for line in value.lines
        ],
        total=money(value.total),
        create_time=timestamp(value.create_time),
        update_time=timestamp(value.update_time),
        expire_time=(None if value.payment_deadline is None else timestamp(value.payment_deadline)),
    )


def payment(value: Payment) -> payment_pb2.Payment:
    return payment_pb2.Payment(
        id=value.id,
        order_id=value.order_id,
        amount=money(value.amount),
        status=_PAYMENT_STATUS[value.status],
        amount_refunded=money(value.amount_refunded),
        provider=value.provider,
        provider_reference=value.provider_reference,
        failure_code=value.failure_code,
        failure_message=value.failure_message,
        create_time=timestamp(value.create_time),
        update_time=timestamp(value.update_time),
    )


def optional_money(field: money_pb2.Money | None) -> tuple[Money | None, list[str]]:
    """A request's optional Money field: the value (None when unset) and its problems."""
    if field is None:
        return None, []
    problems = money_problems(field.currency_code, field.units, field.nanos)
    if problems:
        return None, problems
    return Money.from_units_nanos(field.currency_code, field.units, field.nanos), []
