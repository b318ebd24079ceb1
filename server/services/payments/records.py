"""Reading payments and refunds, and the statements the payment use cases share."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.domain.money import Money
from server.domain.payments import Payment, PaymentStatus

PAYMENT_COLUMNS = (
    "id, order_id, customer_id, status, currency, amount, amount_refunded, provider,"
    " provider_reference, failure_code, failure_message, create_time, update_time"
)
GET_PAYMENT = text(f"SELECT {PAYMENT_COLUMNS}, payment_method FROM payments WHERE id = :id")
# Taken after the order's lock (LOCK_ORDER), the order every payment transaction uses.
LOCK_PAYMENT = text(f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = :id FOR UPDATE")
FIND_REFUND_REQUEST = text(
    """
    SELECT r.id, r.payment_id, r.request_fingerprint, r.status, r.failure_code,
           r.failure_message, p.provider_reference AS intent_reference
      FROM refunds r JOIN payments p ON p.id = r.payment_id
     WHERE r.actor = :actor AND r.request_id = :request_id
    """
)
PENDING_REFUND_OF_PAYMENT = text(
    "SELECT id, cancels_order FROM refunds WHERE payment_id = :payment_id AND status = 'PENDING'"
)


def payment_from_row(row: Any) -> Payment:
    return Payment(
        id=str(row.id),
        order_id=str(row.order_id),
        customer_id=row.customer_id,
        status=PaymentStatus(row.status),
        amount=Money(row.currency, row.amount),
        amount_refunded=Money(row.currency, row.amount_refunded),
        provider=row.provider,
        provider_reference=row.provider_reference or "",
        failure_code=row.failure_code,
        failure_message=row.failure_message,
        create_time=row.create_time,
        update_time=row.update_time,
    )


async def load_payment(reads: AsyncEngine, payment_id: uuid.UUID) -> Payment:
    """The payment as stored now, read outside any transaction of the caller's."""
    async with reads.connect() as conn:
        return payment_from_row((await conn.execute(GET_PAYMENT, {"id": payment_id})).one())
