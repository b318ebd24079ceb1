"""Reading payments: one payment, and an order's payments page by page."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.db.engine import autocommit_reads
from server.domain.errors import NotFound
from server.domain.identity import Principal
from server.domain.payments import Payment
from server.services.paging import NEWEST_FIRST, next_page_token, page_start
from server.services.payments.records import GET_PAYMENT, PAYMENT_COLUMNS, payment_from_row

_LIST_PAYMENTS = text(
    f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE order_id = :order_id AND {NEWEST_FIRST}"
)
_ORDER_OWNER = text("SELECT customer_id FROM orders WHERE id = :id")


class PaymentReads:
    def __init__(self, engine: AsyncEngine) -> None:
        self._reads = autocommit_reads(engine)

    async def get_payment(self, principal: Principal, payment_id: str) -> Payment:
        async with self._reads.connect() as conn:
            row = (await conn.execute(GET_PAYMENT, {"id": uuid.UUID(payment_id)})).first()
        # Another customer's payment is reported as absent, like their orders.
        if row is None or not principal.may_see_customer(row.customer_id):
            raise NotFound("payment", payment_id)
        return payment_from_row(row)

    async def list_payments(
        self, principal: Principal, order_id: str, page_size: int, page_token: str
    ) -> tuple[list[Payment], str]:
        """An order's payments, newest first, for whoever may see the order."""
        params = page_start(page_token, page_size, kind="payments", scope=order_id)
        params["order_id"] = uuid.UUID(order_id)
        async with self._reads.connect() as conn:
            owner = (await conn.execute(_ORDER_OWNER, {"id": params["order_id"]})).first()
            if owner is None or not principal.may_see_customer(owner.customer_id):
                raise NotFound("order", order_id)
            rows = (await conn.execute(_LIST_PAYMENTS, params)).all()
        payments = [payment_from_row(row) for row in rows[:page_size]]
        return payments, next_page_token(rows, page_size, kind="payments", scope=order_id)
