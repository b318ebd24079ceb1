"""Warehouse messages in: stock levels and shipments, and the stock of warehouse-managed
products they decide (the formula: server/domain/inventory.py).

Each message is applied in one transaction, the consumer's inbox row's (server/events/
warehouse.py), on the connection it hands in. Locks follow every other writer's order: the
order's row first, then products in ascending id order (server/services/stock.py), so a
shipment, a cancellation and an order placement never wait on each other in a cycle. Every
transaction that changes an input of a product's formula (a level, a shipment, an order
leaving a stock-holding status) holds that product's row lock when it recounts, so the last
to commit counts what all the others committed.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from server.domain.inventory import (
    AppliedLevel,
    InventorySource,
    OrderedProduct,
    Shipment,
    ShippedUnits,
    StockLevel,
    WarehouseMessageRefused,
    is_reflected,
    level_applies,
    plan_shipment,
    sellable,
)
from server.domain.orders import OrderStatus
from server.events.builders import ShippedUnits as ShippedLine
from server.events.builders import StockChangeCause, order_shipped, stock_changed
from server.events.outbox import Outbox, OutboxEvent
from server.services.orders.records import LOCK_ORDER, SET_ORDER_STATUS

_log = structlog.get_logger("marketplace.warehouse")

_LOCK_PRODUCT_BY_SKU = text("SELECT id, inventory_source FROM products WHERE sku = :sku FOR UPDATE")
_LEVEL = text(
    "SELECT on_hand, version FROM warehouse_levels"
    " WHERE product_id = :product_id AND warehouse = :warehouse"
)
_SAVE_LEVEL = text(
    """
    INSERT INTO warehouse_levels (product_id, warehouse, on_hand, version, update_time)
    VALUES (:product_id, :warehouse, :on_hand, :version, now())
    ON CONFLICT (product_id, warehouse) DO UPDATE
       SET on_hand = excluded.on_hand, version = excluded.version, update_time = now()
    """
)
_MARK_REFLECTED = text(
    """
    UPDATE shipment_lines SET reflected = true
     WHERE product_id = :product_id AND warehouse = :warehouse AND NOT reflected
       AND level_version <= :version
    """
)
_SHIPMENT_SEEN = text("SELECT order_id FROM shipments WHERE id = :id")
_ORDERED = text(
    """
    SELECT ol.product_id, ol.sku, ol.quantity, p.inventory_source,
           coalesce((SELECT sum(sl.quantity) FROM shipment_lines sl
                      WHERE sl.order_id = ol.order_id AND sl.product_id = ol.product_id),
                    0) AS shipped
      FROM order_lines ol JOIN products p ON p.id = ol.product_id
     WHERE ol.order_id = :order_id
    """
)
_LOCK_PRODUCTS = text(
    "SELECT id FROM products WHERE id = ANY(CAST(:ids AS uuid[])) ORDER BY id FOR UPDATE"
)
_LEVELS_OF = text(
    """
    SELECT product_id, warehouse, on_hand, version FROM warehouse_levels
     WHERE product_id = ANY(CAST(:ids AS uuid[]))
    """
)
_INSERT_SHIPMENT = text(
    "INSERT INTO shipments (id, order_id, warehouse) VALUES (:id, :order_id, :warehouse)"
)
_INSERT_SHIPMENT_LINES = text(
    """
    INSERT INTO shipment_lines (shipment_id, product_id, order_id, warehouse, sku, quantity,
                                level_version, reflected)
    SELECT :shipment_id, l.product_id, :order_id, :warehouse, l.sku, l.quantity,
           l.level_version, l.reflected
      FROM unnest(CAST(:product_ids AS uuid[]), CAST(:skus AS text[]),
                  CAST(:quantities AS int[]), CAST(:level_versions AS bigint[]),
                  CAST(:reflected AS boolean[]))
           AS l(product_id, sku, quantity, level_version, reflected)
    """
)

# What the formula reads, per product. Each for the products' rows the caller has locked.
_WAREHOUSE_PRODUCTS = text(
    """
    SELECT id, sku, stock FROM products
     WHERE id = ANY(CAST(:ids AS uuid[])) AND inventory_source = 'WAREHOUSE'
    """
)
_IN_FLIGHT = text(
    """
    SELECT product_id, warehouse, quantity, level_version FROM shipment_lines
     WHERE product_id = ANY(CAST(:ids AS uuid[])) AND NOT reflected
    """
)
# Units of open orders not shipped yet. One branch per status so each can start from its
# partial index (orders_pending_expiry, orders_paid) when a product's open orders are fewer
# than its order lines ever; `releasing`: orders this transaction is taking out of a
# stock-holding status (its caller changes their status after the recount).
_COMMITTED = text(
    """
    SELECT product_id, sum(quantity) AS quantity FROM (
        SELECT ol.product_id, ol.quantity
          FROM orders o JOIN order_lines ol ON ol.order_id = o.id
         WHERE o.status = 'PENDING_PAYMENT' AND ol.product_id = ANY(CAST(:ids AS uuid[]))
           AND o.id <> ALL(CAST(:releasing AS uuid[]))
        UNION ALL
        SELECT ol.product_id,
               ol.quantity - coalesce((SELECT sum(sl.quantity) FROM shipment_lines sl
                                        WHERE sl.order_id = o.id
                                          AND sl.product_id = ol.product_id), 0)
          FROM orders o JOIN order_lines ol ON ol.order_id = o.id
         WHERE o.status = 'PAID' AND ol.product_id = ANY(CAST(:ids AS uuid[]))
           AND o.id <> ALL(CAST(:releasing AS uuid[]))
    ) AS open_lines
    GROUP BY product_id
    """
)
_SET_STOCK = text(
    """
    UPDATE products p SET stock = s.stock, update_time = now(),
                          event_sequence = p.event_sequence + 1
      FROM unnest(CAST(:ids AS uuid[]), CAST(:stocks AS bigint[])) AS s(id, stock)
     WHERE p.id = s.id
    RETURNING p.id, p.event_sequence, p.update_time
    """
)


@dataclass(frozen=True, slots=True)
class StockChange:
    """A warehouse-managed product's sellable stock moved from `before` to `after`; the
    product's event `sequence` and the change's `time` (from its UPDATE)."""

    product_id: str
    sku: str
    before: int
    after: int
    sequence: int
    time: datetime

    def event(
        self,
        cause: StockChangeCause,
        *,
        order_ids: Iterable[str] = (),
        shipment_id: str = "",
        warehouse: str = "",
    ) -> OutboxEvent:
        """The change's inventory.stock_changed."""
        return stock_changed(
            product_id=self.product_id,
            sku=self.sku,
            stock=self.after,
            delta=self.after - self.before,
            cause=cause,
            sequence=self.sequence,
            occur_time=self.time,
            order_ids=order_ids,
            shipment_id=shipment_id,
            warehouse=warehouse,
        )


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying a message changed: the stock of these products (for the product cache),
    and the order it shipped, when that order became SHIPPED."""

    stock_changes: tuple[StockChange, ...] = ()
    shipped_order: str | None = None

    @property
    def products(self) -> list[str]:
        return [change.product_id for change in self.stock_changes]


class WarehouseFeed:
    """The two warehouse use cases. Each runs on the connection of the consumer's inbox
    transaction (`Inbox.once`), so the message is recorded as applied with its effect and
    its events."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    async def apply_stock_level(self, conn: AsyncConnection, level: StockLevel) -> Applied:
        """Applies a warehouse's stock level unless one as new was applied before, and
        recounts the product. Refuses (WarehouseMessageRefused) an unknown SKU and a
        product the warehouse does not manage."""
        product = (await conn.execute(_LOCK_PRODUCT_BY_SKU, {"sku": level.sku})).first()
        if product is None:
            raise WarehouseMessageRefused(f"no product has sku {level.sku!r}")
        if product.inventory_source != InventorySource.WAREHOUSE:
            raise WarehouseMessageRefused(
                f"product {product.id} (sku {level.sku!r}) is not managed by the warehouse"
            )
        key = {"product_id": product.id, "warehouse": level.warehouse}
        row = (await conn.execute(_LEVEL, key)).first()
        applied = None if row is None else AppliedLevel(row.on_hand, row.version)
        if not level_applies(applied, level):
            return Applied()  # as new or newer already applied: this one is history
        await conn.execute(_SAVE_LEVEL, {**key, "on_hand": level.on_hand, "version": level.version})
        await conn.execute(_MARK_REFLECTED, {**key, "version": level.version})
        changes = await recount_warehouse_stock(conn, [product.id])
        await self._outbox.append(
            conn,
            [
                change.event(StockChangeCause.WAREHOUSE_LEVEL, warehouse=level.warehouse)
                for change in changes
            ],
        )
        return Applied(tuple(changes))

    async def apply_shipment(self, conn: AsyncConnection, shipment: Shipment) -> Applied:
        """Records a shipment unless its id was seen before, takes a paid order to SHIPPED
        once all its warehouse lines have shipped, and recounts the shipped products.
        Refuses (WarehouseMessageRefused) an unknown order and what plan_shipment refuses."""
        order_id = uuid.UUID(shipment.order_id)
        order = (await conn.execute(LOCK_ORDER, {"id": order_id})).first()
        if order is None:
            raise WarehouseMessageRefused(f"no order has id {shipment.order_id}")
        seen = (await conn.execute(_SHIPMENT_SEEN, {"id": shipment.shipment_id})).first()
        if seen is not None:
            if seen.order_id != order_id:
                _log.warning(
                    "a shipment id came again for another order; the first one stands",
                    shipment_id=shipment.shipment_id,
                    first_order=str(seen.order_id),
                    order=shipment.order_id,
                )
            return Applied()
        ordered = [
            OrderedProduct(
                str(row.product_id),
                row.sku,
                row.quantity,
                int(row.shipped),
                InventorySource(row.inventory_source),
            )
            for row in await conn.execute(_ORDERED, {"order_id": order_id})
        ]
        status = OrderStatus(order.status)
        plan = plan_shipment(shipment, status, ordered)
        if status is not OrderStatus.PAID:
            _log.warning(
                "the warehouse shipped an order not waiting for it; recorded, status kept",
                shipment_id=shipment.shipment_id,
                order=shipment.order_id,
                status=status.value,
            )
        product_ids = sorted({uuid.UUID(line.product_id) for line in plan.lines})
        await conn.execute(_LOCK_PRODUCTS, {"ids": product_ids})
        levels = await _levels(conn, product_ids)
        await conn.execute(
            _INSERT_SHIPMENT,
            {"id": shipment.shipment_id, "order_id": order_id, "warehouse": shipment.warehouse},
        )
        await conn.execute(
            _INSERT_SHIPMENT_LINES,
            {
                "shipment_id": shipment.shipment_id,
                "order_id": order_id,
                "warehouse": shipment.warehouse,
                "product_ids": [uuid.UUID(line.product_id) for line in plan.lines],
                "skus": [line.sku for line in plan.lines],
                "quantities": [line.quantity for line in plan.lines],
                "level_versions": [line.level_version for line in plan.lines],
                "reflected": [
                    is_reflected(
                        line.level_version, levels[line.product_id].get(shipment.warehouse)
                    )
                    for line in plan.lines
                ],
            },
        )
        events: list[OutboxEvent] = []
        if plan.order_status is not None:
            changed = (
                await conn.execute(
                    SET_ORDER_STATUS, {"id": order_id, "status": plan.order_status.value}
                )
            ).one()
            events.append(
                order_shipped(
                    order_id=shipment.order_id,
                    customer_id=order.customer_id,
                    shipment_id=shipment.shipment_id,
                    warehouse=shipment.warehouse,
                    lines=[
                        ShippedLine(line.product_id, line.sku, line.quantity) for line in plan.lines
                    ],
                    sequence=changed.event_sequence,
                    occur_time=changed.update_time,
                )
            )
        changes = await recount_warehouse_stock(conn, product_ids)
        events += [
            change.event(
                StockChangeCause.SHIPMENT,
                order_ids=[shipment.order_id],
                shipment_id=shipment.shipment_id,
                warehouse=shipment.warehouse,
            )
            for change in changes
        ]
        await self._outbox.append(conn, events)
        shipped_order = shipment.order_id if plan.order_status is not None else None
        return Applied(tuple(changes), shipped_order)


async def _levels(
    conn: AsyncConnection, product_ids: Sequence[uuid.UUID]
) -> dict[str, dict[str, AppliedLevel]]:
    """The applied levels of these products, by product and warehouse."""
    levels: dict[str, dict[str, AppliedLevel]] = {str(p): {} for p in product_ids}
    for row in await conn.execute(_LEVELS_OF, {"ids": list(product_ids)}):
        levels[str(row.product_id)][row.warehouse] = AppliedLevel(row.on_hand, row.version)
    return levels


async def recount_warehouse_stock(
    conn: AsyncConnection,
    product_ids: Collection[uuid.UUID],
    *,
    releasing: Collection[uuid.UUID] = (),
) -> list[StockChange]:
    """Sets the stock of those of these products the warehouse manages to the formula's
    value (server/domain/inventory.py) and returns the ones that moved; the caller writes
    their events. The caller holds the products' row locks; `releasing` names orders it
    takes out of a stock-holding status in this transaction (before or after this call:
    their units count no more either way)."""
    if not product_ids:
        return []
    products = (await conn.execute(_WAREHOUSE_PRODUCTS, {"ids": sorted(product_ids)})).all()
    if not products:
        return []
    ids = [row.id for row in products]
    levels = await _levels(conn, ids)
    shipped: dict[str, list[ShippedUnits]] = defaultdict(list)
    for row in await conn.execute(_IN_FLIGHT, {"ids": ids}):
        shipped[str(row.product_id)].append(
            ShippedUnits(row.warehouse, row.quantity, row.level_version)
        )
    committed = {
        str(row.product_id): int(row.quantity)
        for row in await conn.execute(_COMMITTED, {"ids": ids, "releasing": list(releasing)})
    }
    moved: dict[str, tuple[str, int, int]] = {}
    for row in products:
        product_id = str(row.id)
        after = sellable(levels[product_id], committed.get(product_id, 0), shipped[product_id])
        if after != row.stock:
            moved[product_id] = (row.sku, row.stock, after)
    if not moved:
        return []
    written = await conn.execute(
        _SET_STOCK,
        {
            "ids": [uuid.UUID(product_id) for product_id in moved],
            "stocks": [after for _, _, after in moved.values()],
        },
    )
    changes = [
        StockChange(str(row.id), *moved[str(row.id)], row.event_sequence, row.update_time)
        for row in written
    ]
    return sorted(changes, key=lambda change: change.product_id)
