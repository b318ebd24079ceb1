"""Reading orders: one order, and a caller's orders page by page."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.db.engine import autocommit_reads
from server.domain.identity import Principal
from server.domain.orders import Order
from server.services.orders.records import load_visible_order, with_lines
from server.services.paging import NEWEST_FIRST, next_page_token, page_start
from server.services.rows import ORDER_COLUMNS

_LIST_ALL = text(f"SELECT {ORDER_COLUMNS} FROM orders WHERE {NEWEST_FIRST}")
_LIST_FOR_CUSTOMER = text(
    f"SELECT {ORDER_COLUMNS} FROM orders WHERE customer_id = :customer_id AND {NEWEST_FIRST}"
)


class OrderReads:
    def __init__(self, engine: AsyncEngine) -> None:
        self._reads = autocommit_reads(engine)

    async def get_order(self, principal: Principal, order_id: str) -> Order:
        async with self._reads.connect() as conn:
            return await load_visible_order(conn, principal, order_id, lock=False)

    async def list_orders(
        self, principal: Principal, page_size: int, page_token: str
    ) -> tuple[list[Order], str]:
        """Newest first: every order for an admin, a customer's own otherwise."""
        scope = "*" if principal.is_admin else principal.subject
        params = page_start(page_token, page_size, kind="orders", scope=scope)
        async with self._reads.connect() as conn:
            if principal.is_admin:
                rows = (await conn.execute(_LIST_ALL, params)).all()
            else:
                params["customer_id"] = principal.subject
                rows = (await conn.execute(_LIST_FOR_CUSTOMER, params)).all()
            orders = await with_lines(conn, rows[:page_size])
        return orders, next_page_token(rows, page_size, kind="orders", scope=scope)
