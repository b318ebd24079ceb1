"""Turning result rows into domain objects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.domain.catalog import Product
from server.domain.inventory import InventorySource
from server.domain.money import Money
from server.domain.orders import Order, OrderLine, OrderStatus

PRODUCT_COLUMNS = (
    "id, sku, name, description, price_currency, price_amount, stock, create_time, update_time,"
    " inventory_source"
)
ORDER_COLUMNS = "id, customer_id, status, currency, total, create_time, update_time, expire_time"
LINE_COLUMNS = "order_id, product_id, sku, quantity, unit_price, currency"


def product_from_row(row: Any) -> Product:
    return Product(
        id=str(row.id),
        sku=row.sku,
        name=row.name,
        description=row.description,
        price=Money(row.price_currency, row.price_amount),
        stock=row.stock,
        create_time=row.create_time,
        update_time=row.update_time,
        inventory_source=InventorySource(row.inventory_source),
    )


def line_from_row(row: Any) -> OrderLine:
    return OrderLine(
        product_id=str(row.product_id),
        sku=row.sku,
        quantity=row.quantity,
        unit_price=Money(row.currency, row.unit_price),
    )


def order_from_rows(row: Any, line_rows: Sequence[Any]) -> Order:
    return Order(
        id=str(row.id),
        customer_id=row.customer_id,
        status=OrderStatus(row.status),
        lines=tuple(line_from_row(line) for line in line_rows),
        total=Money(row.currency, row.total),
        create_time=row.create_time,
        update_time=row.update_time,
        expire_time=row.expire_time,
    )
