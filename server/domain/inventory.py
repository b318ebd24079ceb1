"""Warehouse-managed stock: what the warehouse's messages say, whether one changes anything,
and the one formula for how many units of a product may still be sold.

A product is MANAGED_HERE (AdjustStock moves its stock) or WAREHOUSE: an external warehouse
reports absolute on-hand levels per SKU and warehouse, each with a `version` that only grows,
and reports each shipment with, per line, `level_version`: the version of that SKU's level at
that warehouse which first reflects the shipped units (the warehouse decremented on-hand when
it shipped, so it knows). Then, per product:

    sellable = max(0, Σ over warehouses of the last applied on-hand
                      - units of orders not yet shipped (PENDING_PAYMENT, PAID)
                      - shipped units whose level_version is newer than the applied level)

Shipment before its level: the units leave "committed" and enter "shipped, not reflected",
so they stay subtracted. Level before its shipment: the level already excludes them and they
are still committed, so they are subtracted twice until the shipment arrives: the product
sells at most that shipment's units too few, never a unit too many. Either way, once
messages stop the result is on-hand - unshipped. Without `level_version` a shipment could
not tell whether the level in hand already counts it, and in one of those two orders its
units would become sellable twice.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from server.domain.errors import ErrorReason, FailedPrecondition, PreconditionViolation
from server.domain.orders import OrderEvent, OrderStatus, next_status


class InventorySource(enum.StrEnum):
    """Who counts a product's stock."""

    MANAGED_HERE = "MANAGED_HERE"  # the marketplace: AdjustStock
    WAREHOUSE = "WAREHOUSE"  # an external warehouse's levels and shipments


SKU_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")  # the catalog's too
# A warehouse's name has a SKU's shape.
WAREHOUSE_PATTERN = SKU_PATTERN
MAX_SHIPMENT_ID = 100
# Beyond these a number is a broken sender, not a warehouse (and would overflow bigint sums).
MAX_ON_HAND = 1_000_000_000_000
MAX_VERSION = 2**62
MAX_SHIPMENT_LINES = 100


def stock_managed_by_warehouse(product_id: str) -> FailedPrecondition:
    """AdjustStock on a product whose stock the warehouse counts."""
    return FailedPrecondition(
        f"product {product_id}'s stock is counted by the warehouse; AdjustStock cannot move it",
        reason=ErrorReason.STOCK_MANAGED_BY_WAREHOUSE,
        metadata={"productId": product_id},
        violations=[
            PreconditionViolation(
                ErrorReason.STOCK_MANAGED_BY_WAREHOUSE,
                f"products/{product_id}",
                "inventory_source is INVENTORY_SOURCE_WAREHOUSE",
            )
        ],
    )


class WarehouseMessageRefused(Exception):
    """A warehouse message that can never be applied (malformed, unknown SKU or order, a
    level for a product the warehouse does not manage): the consumer dead-letters it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StockLevel:
    """`warehouse.stock_levels`: the absolute units on hand of a SKU at a warehouse."""

    sku: str
    warehouse: str
    on_hand: int
    version: int

    @property
    def message_id(self) -> str:
        """What makes a repeated level a duplicate (the consumer's inbox key)."""
        return f"{self.sku}/{self.warehouse}/{self.version}"


@dataclass(frozen=True, slots=True)
class ShipmentLine:
    sku: str
    quantity: int
    level_version: int


@dataclass(frozen=True, slots=True)
class Shipment:
    """`warehouse.shipments`: units of an order that left a warehouse."""

    shipment_id: str
    order_id: str
    warehouse: str
    lines: tuple[ShipmentLine, ...]


def _check_sku(problems: list[str], field: str, sku: str) -> None:
    if not SKU_PATTERN.fullmatch(sku):
        problems.append(f"{field} {sku!r} is not 1-64 characters of [A-Za-z0-9._-]")


def _check_warehouse(problems: list[str], warehouse: str) -> None:
    if not WAREHOUSE_PATTERN.fullmatch(warehouse):
        problems.append(f"warehouse {warehouse!r} is not 1-64 characters of [A-Za-z0-9._-]")


def _check_version(problems: list[str], field: str, version: int) -> None:
    if not 1 <= version <= MAX_VERSION:
        problems.append(f"{field} must be between 1 and 2^62 (got {version})")


def _refuse_if_any(problems: list[str]) -> None:
    if problems:
        raise WarehouseMessageRefused("; ".join(problems))


def stock_level(*, sku: str, warehouse: str, on_hand: int, version: int) -> StockLevel:
    """Validates a stock level message's fields."""
    problems: list[str] = []
    _check_sku(problems, "sku", sku)
    _check_warehouse(problems, warehouse)
    if not 0 <= on_hand <= MAX_ON_HAND:
        problems.append(f"onHand must be between 0 and {MAX_ON_HAND:,} (got {on_hand})")
    _check_version(problems, "version", version)
    _refuse_if_any(problems)
    return StockLevel(sku, warehouse, on_hand, version)


def shipment(
    *, shipment_id: str, order_id: str, warehouse: str, lines: Sequence[tuple[str, int, int]]
) -> Shipment:
    """Validates a shipment message's fields; `lines` are (sku, quantity, level_version)."""
    problems: list[str] = []
    if not 1 <= len(shipment_id) <= MAX_SHIPMENT_ID or not shipment_id.isprintable():
        problems.append(f"shipmentId must be 1-{MAX_SHIPMENT_ID} printable characters")
    canonical_order_id = ""
    try:
        canonical_order_id = str(uuid.UUID(order_id))
    except ValueError:
        problems.append(f"orderId {order_id!r} is not a UUID")
    _check_warehouse(problems, warehouse)
    if not lines:
        problems.append("a shipment needs at least one line")
    elif len(lines) > MAX_SHIPMENT_LINES:
        problems.append(f"a shipment has at most {MAX_SHIPMENT_LINES} lines")
    seen: set[str] = set()
    for index, (sku, quantity, level_version) in enumerate(lines[:MAX_SHIPMENT_LINES]):
        _check_sku(problems, f"lines[{index}].sku", sku)
        if sku in seen:
            problems.append(f"lines[{index}] repeats sku {sku!r}")
        seen.add(sku)
        if quantity < 1:
            problems.append(f"lines[{index}].quantity must be at least 1 (got {quantity})")
        _check_version(problems, f"lines[{index}].levelVersion", level_version)
    _refuse_if_any(problems)
    return Shipment(
        shipment_id,
        canonical_order_id,
        warehouse,
        tuple(ShipmentLine(sku, quantity, version) for sku, quantity, version in lines),
    )


@dataclass(frozen=True, slots=True)
class AppliedLevel:
    """The level of a SKU at one warehouse that the marketplace applied last."""

    on_hand: int
    version: int


def level_applies(applied: AppliedLevel | None, level: StockLevel) -> bool:
    """Levels only move forward: an older or repeated version changes nothing."""
    return applied is None or level.version > applied.version


def is_reflected(level_version: int, applied: AppliedLevel | None) -> bool:
    """Whether the applied level already excludes units shipped at `level_version`."""
    return applied is not None and level_version <= applied.version


@dataclass(frozen=True, slots=True)
class ShippedUnits:
    """Units of a product in one shipment line."""

    warehouse: str
    quantity: int
    level_version: int


def sellable(
    levels: Mapping[str, AppliedLevel], committed: int, shipped: Iterable[ShippedUnits]
) -> int:
    """The module's formula: `levels` by warehouse, `committed` the units of the product in
    orders not yet shipped, `shipped` its shipment lines (reflected ones count for nothing,
    so passing only those not known to be reflected is enough)."""
    on_hand = sum(level.on_hand for level in levels.values())
    not_reflected = sum(
        units.quantity
        for units in shipped
        if not is_reflected(units.level_version, levels.get(units.warehouse))
    )
    return max(0, on_hand - committed - not_reflected)


@dataclass(frozen=True, slots=True)
class OrderedProduct:
    """An order's line as a shipment meets it: how much is ordered and already shipped."""

    product_id: str
    sku: str
    quantity: int
    shipped: int
    source: InventorySource


@dataclass(frozen=True, slots=True)
class PlannedLine:
    product_id: str
    sku: str
    quantity: int
    level_version: int


@dataclass(frozen=True, slots=True)
class ShipmentPlan:
    """A shipment to record: its lines by product, and the order's status after it (None:
    unchanged)."""

    lines: tuple[PlannedLine, ...]
    order_status: OrderStatus | None


# A shipment of an order that already left these statuses is still recorded: the units left
# the warehouse whatever the order's fate, and must count until a level reflects them.
_RECORDED_AS_IS = frozenset(
    {OrderStatus.SHIPPED, OrderStatus.CANCELLED, OrderStatus.EXPIRED, OrderStatus.REFUNDED}
)


def plan_shipment(
    shipment: Shipment, status: OrderStatus, ordered: Sequence[OrderedProduct]
) -> ShipmentPlan:
    """Matches a shipment to its order. Refused: a line for a SKU the order does not have
    or for a product managed here, more units than the order has left to ship, an order
    not paid yet (the warehouse is
    asked to ship only paid orders). A paid order becomes SHIPPED once every line of a
    warehouse-managed product has shipped in full (lines managed here are not the
    warehouse's to ship; an order may ship from several warehouses, one shipment each)."""
    if status is OrderStatus.PENDING_PAYMENT:
        raise WarehouseMessageRefused(
            f"order {shipment.order_id} is not paid; the warehouse ships only paid orders"
        )
    by_sku = {line.sku: line for line in ordered}
    problems: list[str] = []
    planned: list[PlannedLine] = []
    for line in shipment.lines:
        order_line = by_sku.get(line.sku)
        if order_line is None:
            problems.append(f"order {shipment.order_id} has no line for sku {line.sku!r}")
            continue
        if order_line.source is not InventorySource.WAREHOUSE:
            # Recorded, it would count against the product's stock if the warehouse took it
            # over later; refused, as a level for it is.
            problems.append(f"{line.sku!r} is not managed by the warehouse")
            continue
        left = order_line.quantity - order_line.shipped
        if line.quantity > left:
            problems.append(
                f"{line.quantity} units of {line.sku!r} shipped; order {shipment.order_id}"
                f" has {left} left to ship"
            )
            continue
        planned.append(
            PlannedLine(order_line.product_id, line.sku, line.quantity, line.level_version)
        )
    _refuse_if_any(problems)
    if status in _RECORDED_AS_IS:
        return ShipmentPlan(tuple(planned), None)
    now_shipped = {line.sku: line.quantity for line in shipment.lines}
    complete = all(
        line.shipped + now_shipped.get(line.sku, 0) >= line.quantity
        for line in ordered
        if line.source is InventorySource.WAREHOUSE
    )
    if not complete:
        return ShipmentPlan(tuple(planned), None)
    return ShipmentPlan(tuple(planned), next_status(shipment.order_id, status, OrderEvent.SHIPPED))
