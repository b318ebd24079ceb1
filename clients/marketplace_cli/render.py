"""Tables for people, proto3 JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import iso4217
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from google.type import money_pb2
from rich import box
from rich.console import Console
from rich.table import Column, Table

from marketplace.catalog.v1 import catalog_pb2
from marketplace.order.v1 import order_pb2
from marketplace.payment.v1 import payment_pb2
from marketplace_client import to_decimal


def message_json(message: Message) -> dict[str, Any]:
    """The message in protobuf's JSON mapping, as the REST API sends it (camelCase, int64
    as strings, enums by name)."""
    return json_format.MessageToDict(message)


def print_json(value: Mapping[str, Any] | list[Any]) -> None:
    # Plain stdout, not Rich: a terminal's width must never wrap what a script parses.
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def money(value: money_pb2.Money) -> str:
    """12.50 USD: the currency's own minor units where that loses nothing."""
    amount = to_decimal(value)
    try:
        exponent = iso4217.Currency(value.currency_code).exponent
    except ValueError:
        exponent = None
    minor = amount.quantize(Decimal(1).scaleb(-exponent)) if exponent is not None else None
    # More places than the currency has are shown, never rounded away.
    shown = minor if minor is not None and minor == amount else amount.normalize()
    return f"{shown:f} {value.currency_code}"


def when(value: timestamp_pb2.Timestamp) -> str:
    if not value.seconds and not value.nanos:
        return ""
    return value.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")


def short_enum(name: str, prefix: str) -> str:
    return name.removeprefix(prefix)


def order_status(order: order_pb2.Order) -> str:
    return short_enum(order_pb2.OrderStatus.Name(order.status), "ORDER_STATUS_")


def payment_status(payment: payment_pb2.Payment) -> str:
    return short_enum(payment_pb2.PaymentStatus.Name(payment.status), "PAYMENT_STATUS_")


def inventory(product: catalog_pb2.Product) -> str:
    name = catalog_pb2.InventorySource.Name(product.inventory_source)
    return short_enum(name, "INVENTORY_SOURCE_").lower().replace("_", " ")


def stock(product: catalog_pb2.Product) -> str:
    """The units, marked when the warehouse counts them (adjust-stock is refused then)."""
    if product.inventory_source == catalog_pb2.INVENTORY_SOURCE_WAREHOUSE:
        return f"{product.stock} (warehouse)"
    return str(product.stock)


def table(*columns: str | Column) -> Table:
    # No vertical rules: the width goes to the ids and SKUs people copy.
    return Table(
        *columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )


def id_column(header: str = "ID") -> Column:
    # Ids are what people copy into the next command: never cut or wrapped.
    return Column(header, no_wrap=True, min_width=36)


def amount_column(header: str) -> Column:
    return Column(header, no_wrap=True, justify="right")


def sku_column() -> Column:
    return Column("SKU", no_wrap=True)


def products_table(products: Iterable[catalog_pb2.Product]) -> Table:
    rows = table(sku_column(), "Name", amount_column("Price"), amount_column("Stock"), id_column())
    for p in products:
        rows.add_row(p.sku, p.name, money(p.price), stock(p), p.id)
    return rows


def product_table(product: catalog_pb2.Product) -> Table:
    fields = Table(show_header=False, box=None)
    for label, value in (
        ("ID", product.id),
        ("SKU", product.sku),
        ("Name", product.name),
        ("Description", product.description),
        ("Price", money(product.price)),
        ("Stock", str(product.stock)),
        ("Stock kept", inventory(product)),
        ("Created", when(product.create_time)),
        ("Updated", when(product.update_time)),
    ):
        fields.add_row(f"[bold]{label}[/]", value)
    return fields


def orders_table(orders: Iterable[order_pb2.Order]) -> Table:
    rows = table(
        id_column(),
        Column("Status", no_wrap=True),
        amount_column("Total"),
        Column("Lines", no_wrap=True),
        Column("Placed (UTC)", no_wrap=True),
    )
    for o in orders:
        lines = "\n".join(f"{item.sku} x{item.quantity}" for item in o.items)
        placed = o.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M")
        rows.add_row(o.id, order_status(o), money(o.total), lines, placed)
    return rows


def order_tables(order: order_pb2.Order) -> list[Table]:
    head = Table(show_header=False, box=None)
    for label, value in (
        ("ID", order.id),
        ("Customer", order.customer_id),
        ("Status", order_status(order)),
        ("Total", money(order.total)),
        ("Placed", when(order.create_time)),
        ("Updated", when(order.update_time)),
        ("Expires", when(order.expire_time)),
    ):
        head.add_row(f"[bold]{label}[/]", value)
    lines = table(
        sku_column(),
        amount_column("Quantity"),
        amount_column("Unit price"),
        amount_column("Line total"),
        id_column("Product ID"),
    )
    for item in order.items:
        lines.add_row(
            item.sku,
            str(item.quantity),
            money(item.unit_price),
            money(item.line_total),
            item.product_id,
        )
    return [head, lines]


def failure(payment: payment_pb2.Payment) -> str:
    if not payment.failure_code:
        return ""
    return f"{payment.failure_message} ({payment.failure_code})"


def payments_table(payments: Iterable[payment_pb2.Payment]) -> Table:
    """Newest first, as listed; `payments get` shows one in full (times, provider)."""
    rows = table(
        id_column(),
        Column("Status", no_wrap=True),
        amount_column("Amount"),
        amount_column("Refunded"),
        "Failure",
    )
    for p in payments:
        rows.add_row(
            p.id, payment_status(p), money(p.amount), money(p.amount_refunded), p.failure_code
        )
    return rows


def payment_table(payment: payment_pb2.Payment) -> Table:
    fields = Table(show_header=False, box=None)
    for label, value in (
        ("ID", payment.id),
        ("Order", payment.order_id),
        ("Status", payment_status(payment)),
        ("Amount", money(payment.amount)),
        ("Refunded", money(payment.amount_refunded)),
        ("Failure", failure(payment)),
        ("Provider", f"{payment.provider} {payment.provider_reference}".strip()),
        ("Created", when(payment.create_time)),
        ("Updated", when(payment.update_time)),
    ):
        fields.add_row(f"[bold]{label}[/]", value)
    return fields


def print_page_hint(console: Console, next_page_token: str, command: str) -> None:
    if next_page_token:
        # soft_wrap: a token cut across lines could not be pasted back
        console.print(
            f"More: {command} --page-token {next_page_token} (or --all)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
