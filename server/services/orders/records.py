"""Reading orders with their lines, and the statements every order use case shares."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from server.domain.errors import NotFound
from server.domain.identity import Principal
from server.domain.orders import Order
from server.services.rows import LINE_COLUMNS, ORDER_COLUMNS, order_from_rows

GET_ORDER = text(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = :id")
# Every transaction that changes an order takes this lock first, then its payment's.
LOCK_ORDER = text(f"SELECT {ORDER_COLUMNS}, now() AS db_now FROM orders WHERE id = :id FOR UPDATE")
# A status change is an event: each bumps the order's event_sequence, and the caller writes
# the event with the sequence and time returned (server/events/outbox.py).
SET_ORDER_STATUS = text(
    """
    UPDATE orders SET status = :status, update_time = now(), event_sequence = event_sequence + 1
     WHERE id = :id
    RETURNING event_sequence, update_time
    """
)
# The (cancelled_by, cancel_request_id) key is unique: a cancel's request_id names one order.
MARK_CANCELLED = text(
    """
    UPDATE orders SET status = :status, cancel_request_id = :request_id, cancelled_by = :actor,
                      update_time = now(), event_sequence = event_sequence + 1
     WHERE id = :id
    RETURNING event_sequence, update_time
    """
)
_GET_ORDERS = text(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = ANY(CAST(:ids AS uuid[]))")
_LINES_OF = text(
    f"SELECT {LINE_COLUMNS} FROM order_lines WHERE order_id = ANY(:order_ids)"
    " ORDER BY order_id, line_no"
)


async def with_lines(conn: AsyncConnection, rows: Sequence[Any]) -> list[Order]:
    """The orders of these rows, with their lines read in one query."""
    if not rows:
        return []
    line_rows = (await conn.execute(_LINES_OF, {"order_ids": [row.id for row in rows]})).all()
    lines_by_order: dict[Any, list[Any]] = defaultdict(list)
    for line_row in line_rows:
        lines_by_order[line_row.order_id].append(line_row)
    return [order_from_rows(row, lines_by_order[row.id]) for row in rows]


async def load_order(conn: AsyncConnection, order_id: uuid.UUID) -> Order:
    row = (await conn.execute(GET_ORDER, {"id": order_id})).one()
    return (await with_lines(conn, [row]))[0]


async def load_orders(
    conn: AsyncConnection, order_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Order]:
    rows = (await conn.execute(_GET_ORDERS, {"ids": list(order_ids)})).all()
    return {row.id: order for row, order in zip(rows, await with_lines(conn, rows), strict=True)}


async def load_visible_order(
    conn: AsyncConnection, principal: Principal, order_id: str, *, lock: bool
) -> Order:
    """The order, if `principal` may see it; `lock` takes its row lock for the transaction."""
    statement = LOCK_ORDER if lock else GET_ORDER
    row = (await conn.execute(statement, {"id": uuid.UUID(order_id)})).first()
    # Another customer's order is reported as absent: its existence is not theirs to know.
    if row is None or not principal.may_see_customer(row.customer_id):
        raise NotFound("order", order_id)
    return (await with_lines(conn, [row]))[0]
