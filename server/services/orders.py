"""Order use cases. `place_order` is the order + stock transaction."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.transactions import retrying_transaction
from server.domain.errors import NotFound, OutOfStock, RequestIdReused, StockShortage
from server.domain.identity import Principal
from server.domain.money import Money
from server.domain.orders import (
    Order,
    OrderLine,
    OrderRequest,
    must_release_stock_on_cancel,
    order_total,
)
from server.domain.pagination import decode_page_token, encode_page_token, invalid_page_token
from server.services.rows import LINE_COLUMNS, ORDER_COLUMNS, order_from_rows

# The order row is inserted first, with its total filled in at the end of the same
# transaction. Inserting it first makes the unique (customer_id, request_id) key the
# arbiter of retries: a concurrent copy of the request blocks on that key until the first
# transaction ends, then sees its order, and never touches stock.
_CLAIM_ORDER = text(
    """
    INSERT INTO orders (id, customer_id, request_id, request_fingerprint, status,
                        currency, total, create_time, update_time)
    VALUES (:id, :customer_id, :request_id, :fingerprint, 'PENDING_PAYMENT',
            'XXX', 0, now(), now())
    ON CONFLICT (customer_id, request_id) DO NOTHING
    RETURNING id
    """
)
_FIND_BY_REQUEST_ID = text(
    "SELECT id, request_fingerprint FROM orders"
    " WHERE customer_id = :customer_id AND request_id = :request_id"
)
# The conditional decrement: it takes the row lock and checks stock in one statement, so
# stock can never go below zero whatever runs concurrently (and CHECK (stock >= 0) backs it).
_RESERVE_STOCK = text(
    """
    UPDATE products SET stock = stock - :quantity, update_time = now()
     WHERE id = :product_id AND stock >= :quantity
    RETURNING sku, price_currency, price_amount
    """
)
_STOCK_LEVEL = text("SELECT stock FROM products WHERE id = :product_id")
_INSERT_LINE = text(
    """
    INSERT INTO order_lines (order_id, line_no, product_id, sku, quantity, unit_price, currency)
    VALUES (:order_id, :line_no, :product_id, :sku, :quantity, :unit_price, :currency)
    """
)
_FINISH_ORDER = text("UPDATE orders SET currency = :currency, total = :total WHERE id = :id")
_GET_ORDER = text(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = :id")
_LOCK_ORDER = text(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = :id FOR UPDATE")
_LINES_OF = text(
    f"SELECT {LINE_COLUMNS} FROM order_lines WHERE order_id = ANY(:order_ids)"
    " ORDER BY order_id, line_no"
)
_RELEASE_STOCK = text(
    "UPDATE products SET stock = stock + :quantity, update_time = now() WHERE id = :product_id"
)
_MARK_CANCELLED = text(
    """
    UPDATE orders SET status = 'CANCELLED', cancel_request_id = :request_id, update_time = now()
     WHERE id = :id
    """
)
_LIST_ALL = text(
    f"""
    SELECT {ORDER_COLUMNS} FROM orders
     WHERE (create_time, id) < (:before_time, :before_id)
     ORDER BY create_time DESC, id DESC LIMIT :limit
    """
)
_LIST_FOR_CUSTOMER = text(
    f"""
    SELECT {ORDER_COLUMNS} FROM orders
     WHERE customer_id = :customer_id AND (create_time, id) < (:before_time, :before_id)
     ORDER BY create_time DESC, id DESC LIMIT :limit
    """
)
_FAR_FUTURE = datetime.fromisoformat("9999-12-31T00:00:00+00:00")
_MAX_UUID = uuid.UUID(int=(1 << 128) - 1)


class Orders:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def place_order(self, customer_id: str, request: OrderRequest) -> Order:
        """Creates the order and decrements stock for every line, all or nothing.

        Returns the existing order when this customer already sent this request_id with the
        same lines; raises RequestIdReused for different lines, NotFound for an unknown
        product, OutOfStock listing every short line.
        """
        async for attempt in retrying_transaction():
            with attempt:
                async with self._engine.begin() as conn:
                    order_id = await self._claim_request_id(conn, customer_id, request)
                    if order_id is None:
                        return await self._replay(conn, customer_id, request)
                    await self._reserve_lines(conn, order_id, request)
                    return await self._load(conn, order_id)
        raise AssertionError("unreachable: retrying_transaction re-raises")

    async def _claim_request_id(
        self, conn: AsyncConnection, customer_id: str, request: OrderRequest
    ) -> uuid.UUID | None:
        order_id = uuid.uuid4()
        claimed = await conn.execute(
            _CLAIM_ORDER,
            {
                "id": order_id,
                "customer_id": customer_id,
                "request_id": request.request_id,
                "fingerprint": request.fingerprint(),
            },
        )
        return order_id if claimed.first() is not None else None

    async def _replay(
        self, conn: AsyncConnection, customer_id: str, request: OrderRequest
    ) -> Order:
        previous = (
            await conn.execute(
                _FIND_BY_REQUEST_ID,
                {"customer_id": customer_id, "request_id": request.request_id},
            )
        ).one()
        if previous.request_fingerprint != request.fingerprint():
            raise RequestIdReused(request.request_id)
        return await self._load(conn, previous.id)

    async def _reserve_lines(
        self, conn: AsyncConnection, order_id: uuid.UUID, request: OrderRequest
    ) -> None:
        reserved: dict[str, OrderLine] = {}
        missing: list[str] = []
        shortages: list[StockShortage] = []
        for line in request.lines_in_lock_order():
            product_id = uuid.UUID(line.product_id)
            params = {"product_id": product_id, "quantity": line.quantity}
            row = (await conn.execute(_RESERVE_STOCK, params)).first()
            if row is not None:
                reserved[line.product_id] = OrderLine(
                    line.product_id,
                    row.sku,
                    line.quantity,
                    Money(row.price_currency, row.price_amount),
                )
                continue
            # Keep going so the caller learns about every short line at once; raising
            # below rolls back the decrements already made.
            level = (await conn.execute(_STOCK_LEVEL, {"product_id": product_id})).first()
            if level is None:
                missing.append(line.product_id)
            else:
                shortages.append(StockShortage(line.product_id, line.quantity, level.stock))
        if missing:
            raise NotFound("product", missing[0])
        if shortages:
            raise OutOfStock(shortages)
        lines = [reserved[line.product_id] for line in request.lines]
        total = order_total(lines)
        await conn.execute(
            _INSERT_LINE,
            [
                {
                    "order_id": order_id,
                    "line_no": number,
                    "product_id": uuid.UUID(line.product_id),
                    "sku": line.sku,
                    "quantity": line.quantity,
                    "unit_price": line.unit_price.amount,
                    "currency": line.unit_price.currency,
                }
                for number, line in enumerate(lines, start=1)
            ],
        )
        await conn.execute(
            _FINISH_ORDER, {"id": order_id, "currency": total.currency, "total": total.amount}
        )

    async def get_order(self, principal: Principal, order_id: str) -> Order:
        async with self._engine.connect() as conn:
            return await self._load_visible(conn, principal, order_id, lock=False)

    async def cancel_order(self, principal: Principal, order_id: str, request_id: str) -> Order:
        """Cancels a pending order and releases its stock in the same transaction."""
        async for attempt in retrying_transaction():
            with attempt:
                async with self._engine.begin() as conn:
                    order = await self._load_visible(conn, principal, order_id, lock=True)
                    if not must_release_stock_on_cancel(order.id, order.status):
                        return order
                    # Same ascending product order as place_order: no lock cycles.
                    for line in sorted(order.lines, key=lambda line: line.product_id):
                        await conn.execute(
                            _RELEASE_STOCK,
                            {"product_id": uuid.UUID(line.product_id), "quantity": line.quantity},
                        )
                    await conn.execute(
                        _MARK_CANCELLED,
                        {"id": uuid.UUID(order.id), "request_id": request_id or None},
                    )
                    return await self._load(conn, uuid.UUID(order.id))
        raise AssertionError("unreachable: retrying_transaction re-raises")

    async def list_orders(
        self, principal: Principal, page_size: int, page_token: str
    ) -> tuple[list[Order], str]:
        scope = "*" if principal.is_admin else principal.subject
        position = decode_page_token(page_token, kind="orders", scope=scope)
        params: dict[str, Any] = {"limit": page_size + 1}
        params["before_time"], params["before_id"] = _FAR_FUTURE, _MAX_UUID
        if position is not None:
            try:
                params["before_time"] = datetime.fromisoformat(str(position["t"]))
                params["before_id"] = uuid.UUID(str(position["id"]))
            except (KeyError, ValueError):
                raise invalid_page_token() from None
        async with self._engine.connect() as conn:
            if principal.is_admin:
                rows = (await conn.execute(_LIST_ALL, params)).all()
            else:
                params["customer_id"] = principal.subject
                rows = (await conn.execute(_LIST_FOR_CUSTOMER, params)).all()
            page = rows[:page_size]
            orders = await self._with_lines(conn, page)
        next_token = ""
        if len(rows) > page_size:
            last = page[-1]
            next_token = encode_page_token(
                "orders", scope, {"t": last.create_time.isoformat(), "id": str(last.id)}
            )
        return orders, next_token

    async def _load_visible(
        self, conn: AsyncConnection, principal: Principal, order_id: str, *, lock: bool
    ) -> Order:
        statement = _LOCK_ORDER if lock else _GET_ORDER
        row = (await conn.execute(statement, {"id": uuid.UUID(order_id)})).first()
        # Another customer's order is reported as absent: its existence is not theirs to know.
        if row is None or not principal.may_see_customer(row.customer_id):
            raise NotFound("order", order_id)
        return (await self._with_lines(conn, [row]))[0]

    async def _load(self, conn: AsyncConnection, order_id: uuid.UUID) -> Order:
        row = (await conn.execute(_GET_ORDER, {"id": order_id})).one()
        return (await self._with_lines(conn, [row]))[0]

    async def _with_lines(self, conn: AsyncConnection, rows: Sequence[Any]) -> list[Order]:
        if not rows:
            return []
        line_rows = (await conn.execute(_LINES_OF, {"order_ids": [row.id for row in rows]})).all()
        lines_by_order: dict[Any, list[Any]] = defaultdict(list)
        for line_row in line_rows:
            lines_by_order[line_row.order_id].append(line_row)
        return [order_from_rows(row, lines_by_order[row.id]) for row in rows]
