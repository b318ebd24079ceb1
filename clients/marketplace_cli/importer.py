"""`marketplace import`: a CSV of products made true in the catalog, row by row.

Each row is compared with the product of its SKU: a new SKU is created, a differing one is
updated (UpdateProduct with a mask of the fields that differ, stock through AdjustStock by
the difference), an equal one is left alone. So running the same file twice changes
nothing the second time, and a bad row is reported without stopping the others.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

import grpc

from marketplace.catalog.v1 import catalog_pb2
from marketplace_cli.exits import UNAVAILABILITIES, error_json, error_summary
from marketplace_client import (
    AlreadyExistsError,
    MarketplaceClient,
    MarketplaceError,
    to_decimal,
    to_money,
)

COLUMNS = ("sku", "name", "description", "price", "currency", "stock")
# Stock adjustments' request ids are uuid5 names in this namespace (a fixed, random uuid4).
STOCK_REQUEST_NAMESPACE = uuid.UUID("6f1c0f5e-3f59-4c39-9a55-8f3f8c6f2e11")


# Failures that are no row's fault: the import stops instead of refusing every row alike.
STOPS = UNAVAILABILITIES | {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class ImportFileError(ValueError):
    """The file cannot be imported at all (no header, a required column missing)."""


class Outcome(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Row:
    """One CSV row, parsed; `stock` None (an empty cell) leaves an existing product's alone."""

    line: int
    sku: str
    name: str
    description: str
    price: Decimal
    currency: str
    stock: int | None


@dataclass(frozen=True, slots=True)
class RowResult:
    line: int
    sku: str
    outcome: Outcome
    # what changed (updated), or why not (refused)
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "sku": self.sku,
            "outcome": str(self.outcome),
            "detail": self.detail,
        }


@dataclass
class Summary:
    results: list[RowResult] = field(default_factory=list)
    # Set when the server became unavailable: the rows after the last result were not tried.
    stopped_by: MarketplaceError | None = None

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def refused(self) -> list[RowResult]:
        return [r for r in self.results if r.outcome is Outcome.REFUSED]

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            **{str(outcome): self.count(outcome) for outcome in Outcome},
            "rows": [r.as_json() for r in self.results],
        }
        if self.stopped_by is not None:
            body["stoppedBy"] = error_json(self.stopped_by)["error"]
        return body


def parse_rows(text: str) -> list[Row | RowResult]:
    """Every data row, parsed, or refused (with the reason) when it cannot be: a bad price,
    stock or currency code, or a SKU an earlier row already has. The server checks the rest
    (SKU characters, lengths, a currency's minor units) and refuses with its own words."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [name.strip().lower() for name in reader.fieldnames or ()]
    missing = [c for c in COLUMNS if c not in header and c != "description"]
    if missing:
        raise ImportFileError(
            f"the header lacks {', '.join(missing)}: the columns are {', '.join(COLUMNS)}"
        )
    reader.fieldnames = header
    rows: list[Row | RowResult] = []
    first_line_of: dict[str, int] = {}
    for record in reader:
        # reader.line_num is the line the record ended on: right for one-line records
        line = reader.line_num
        cells = {key: (value or "").strip() for key, value in record.items() if key}
        sku = cells.get("sku", "")
        problem = _problem(cells)
        if problem is None and sku in first_line_of:
            problem = f"sku {sku} is also on line {first_line_of[sku]}; the first one is used"
        if problem is not None:
            rows.append(RowResult(line, sku, Outcome.REFUSED, problem))
            continue
        first_line_of[sku] = line
        stock = cells.get("stock", "")
        rows.append(
            Row(
                line=line,
                sku=sku,
                name=cells.get("name", ""),
                description=cells.get("description", ""),
                price=Decimal(cells["price"]),
                currency=cells["currency"].upper(),
                stock=int(stock) if stock else None,
            )
        )
    return rows


def _problem(cells: dict[str, str]) -> str | None:
    try:
        price = Decimal(cells.get("price", ""))
    except InvalidOperation:
        return f"price: {cells.get('price', '')!r} is not a number"
    if not price.is_finite():
        return f"price: {cells.get('price', '')!r} is not a number"
    try:
        to_money(price, "XXX")
    except ValueError as error:
        return f"price: {error}"
    currency = cells.get("currency", "")
    if len(currency) != 3 or not currency.isalpha():
        return f"currency: {currency!r} is not a three-letter ISO 4217 code"
    stock = cells.get("stock", "")
    if stock and not (stock.isdigit() and stock.isascii()):
        return f"stock: {stock!r} is not a whole number of units (0 or more)"
    return None


def stock_request_id(product: catalog_pb2.Product, target: int) -> str:
    """The AdjustStock request id for moving `product`, as read, to `target` units: derived,
    not random, so a replay of the same move is applied once; the product's update time
    makes the next move to the same level (after orders took stock again) a new request."""
    moment = product.update_time.ToJsonString() if product.HasField("update_time") else ""
    name = f"{product.id}|{moment}|{product.stock}->{target}"
    return str(uuid.uuid5(STOCK_REQUEST_NAMESPACE, name))


def changed_fields(product: catalog_pb2.Product, row: Row) -> dict[str, Any]:
    """The update_product arguments for what the row changes (price and currency together)."""
    changes: dict[str, Any] = {}
    if product.name != row.name:
        changes["name"] = row.name
    if product.description != row.description:
        changes["description"] = row.description
    if product.price.currency_code != row.currency or to_decimal(product.price) != row.price:
        changes["price"] = row.price
        changes["currency"] = row.currency
    return changes


async def catalog_by_sku(client: MarketplaceClient) -> dict[str, catalog_pb2.Product]:
    return {p.sku: p async for p in client.list_products(page_size=1000)}


async def import_row(
    client: MarketplaceClient,
    row: Row,
    existing: catalog_pb2.Product | None,
    *,
    reason: str,
) -> RowResult:
    """Makes the catalog agree with one row. A refusal becomes the row's result; an
    unavailable server or a token that may not write raises (every later row would fail
    the same way)."""
    try:
        return await _apply(client, row, existing, reason=reason)
    except MarketplaceError as error:
        if error.code in STOPS:
            raise
        return RowResult(row.line, row.sku, Outcome.REFUSED, error_summary(error))


async def _apply(
    client: MarketplaceClient, row: Row, existing: catalog_pb2.Product | None, *, reason: str
) -> RowResult:
    if existing is None:
        try:
            await client.create_product(
                sku=row.sku,
                name=row.name,
                description=row.description,
                price=row.price,
                currency=row.currency,
                stock=row.stock or 0,
            )
            return RowResult(row.line, row.sku, Outcome.CREATED)
        except AlreadyExistsError:
            # Created since the catalog was read (or by this very call, whose answer was
            # lost and retried): update it like any existing product.
            existing = (await catalog_by_sku(client)).get(row.sku)
            if existing is None:
                raise
    done: list[str] = []
    changes = changed_fields(existing, row)
    if changes:
        await client.update_product(existing.id, **changes)
        done += [name for name in changes if name != "currency"]
    if row.stock is not None and row.stock != existing.stock:
        delta = row.stock - existing.stock
        await client.adjust_stock(
            existing.id, delta, reason, request_id=stock_request_id(existing, row.stock)
        )
        done.append(f"stock {delta:+d}")
    if not done:
        return RowResult(row.line, row.sku, Outcome.UNCHANGED)
    return RowResult(row.line, row.sku, Outcome.UPDATED, ", ".join(done))


async def import_rows(
    client: MarketplaceClient,
    rows: Iterable[Row | RowResult],
    *,
    reason: str,
    advance: Callable[[RowResult], None],
) -> Summary:
    """Imports the rows in file order, calling `advance` after each; stops at the first
    row the server could not be reached for, or refused for the token (the summary says so
    in `stopped_by`)."""
    summary = Summary()
    try:
        catalog = await catalog_by_sku(client)
        for row in rows:
            result = (
                row
                if isinstance(row, RowResult)
                else await import_row(client, row, catalog.get(row.sku), reason=reason)
            )
            summary.results.append(result)
            advance(result)
    except MarketplaceError as error:
        if error.code not in STOPS:
            raise
        summary.stopped_by = error
    return summary
