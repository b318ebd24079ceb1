"""Giving an order's stock back, and the one thing that must stop it: a payment in flight.
Shared by cancellation, refunds and expiry."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from server.domain.inventory import InventorySource
from server.events.builders import StockChangeCause, stock_changed
from server.events.outbox import Outbox, OutboxEvent
from server.services.warehouse import recount_warehouse_stock

# Lock the products in ascending id order (the order every writer uses, so no lock cycles),
# then add back what the orders' lines took (an order has a product on one line at most) to
# the products managed here. A warehouse product's stock is recounted instead: clamped at
# zero, it may hold less than its orders took, and adding back would sell units twice.
_LOCK_LINE_PRODUCTS = text(
    """
    SELECT id, inventory_source FROM products
     WHERE id IN (SELECT product_id FROM order_lines WHERE order_id = ANY(:order_ids))
     ORDER BY id FOR UPDATE
    """
)
_RELEASED_ORDERS_OF = text(
    """
    SELECT product_id, array_agg(CAST(order_id AS text) ORDER BY order_id) AS order_ids
      FROM order_lines WHERE order_id = ANY(:order_ids) AND product_id = ANY(:product_ids)
     GROUP BY product_id
    """
)
_RELEASE_STOCK = text(
    """
    UPDATE products p SET stock = p.stock + taken.quantity, update_time = now(),
                          event_sequence = p.event_sequence + 1
      FROM (SELECT product_id, sum(quantity) AS quantity,
                   array_agg(CAST(order_id AS text) ORDER BY order_id) AS order_ids
              FROM order_lines
             WHERE order_id = ANY(:order_ids) GROUP BY product_id) AS taken
     WHERE p.id = taken.product_id AND p.inventory_source = 'MANAGED_HERE'
    RETURNING p.id, p.sku, p.stock, taken.quantity, taken.order_ids, p.event_sequence,
              p.update_time
    """
)
_PAYMENTS_IN_FLIGHT = text(
    "SELECT order_id, id FROM payments WHERE order_id = ANY(:ids) AND status = 'PENDING'"
)


async def release_stock(
    conn: AsyncConnection, order_ids: Sequence[uuid.UUID], outbox: Outbox
) -> list[str]:
    """Puts the orders' units back on sale (a warehouse product's stock recounted without
    them), with a stock_changed event per product whose stock moved, and returns those
    products' ids. The caller moves the orders out of a stock-holding status in
    the same transaction, under the orders' row locks, so each order's stock comes back
    exactly once."""
    locked = (await conn.execute(_LOCK_LINE_PRODUCTS, {"order_ids": list(order_ids)})).all()
    released = sorted((await conn.execute(_RELEASE_STOCK, {"order_ids": list(order_ids)})).all())
    recounted = await _recount_warehouse_products(conn, order_ids, locked)
    await outbox.append(
        conn,
        [
            stock_changed(
                product_id=str(row.id),
                sku=row.sku,
                stock=row.stock,
                delta=row.quantity,
                cause=StockChangeCause.ORDER_RELEASED,
                sequence=row.event_sequence,
                occur_time=row.update_time,
                order_ids=row.order_ids,
            )
            for row in released
        ]
        + [event for _, event in recounted],
    )
    return [str(row.id) for row in released] + [product_id for product_id, _ in recounted]


async def _recount_warehouse_products(
    conn: AsyncConnection, order_ids: Sequence[uuid.UUID], locked: Sequence[Any]
) -> list[tuple[str, OutboxEvent]]:
    """The warehouse products among `locked` recounted without these orders' units; the
    products whose stock moved, each with its event."""
    warehouse_ids = [row.id for row in locked if row.inventory_source == InventorySource.WAREHOUSE]
    if not warehouse_ids:
        return []
    changes = await recount_warehouse_stock(conn, warehouse_ids, releasing=order_ids)
    orders_of = {
        str(row.product_id): row.order_ids
        for row in await conn.execute(
            _RELEASED_ORDERS_OF,
            {
                "order_ids": list(order_ids),
                "product_ids": [uuid.UUID(c.product_id) for c in changes],
            },
        )
    }
    return [
        (
            change.product_id,
            change.event(StockChangeCause.ORDER_RELEASED, order_ids=orders_of[change.product_id]),
        )
        for change in changes
    ]


async def payments_in_flight(
    conn: AsyncConnection, order_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """Which of these orders have a payment still PENDING (its charge may yet succeed), and
    one such payment of each. Read by a new statement, so it sees payments committed after
    the transaction's earlier snapshots."""
    rows = await conn.execute(_PAYMENTS_IN_FLIGHT, {"ids": list(order_ids)})
    return {row.order_id: row.id for row in rows}
