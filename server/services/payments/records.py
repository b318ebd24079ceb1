"""Reading and recording payments and refunds: the statements and row helpers the payment
use cases (and a paid order's cancellation) share."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.transactions import UNIQUE_VIOLATION, sqlstate
from server.domain.errors import ErrorReason, FailedPrecondition, RequestIdReused, check_replay
from server.domain.money import Money
from server.domain.payments import Payment, PaymentStatus, RefundStatus, refund_refused

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


_INSERT_REFUND = text(
    """
    INSERT INTO refunds (id, payment_id, actor, request_id, request_fingerprint, currency,
                         amount, reason, cancels_order, status, next_check_time)
    VALUES (:id, :payment_id, :actor, :request_id, :fingerprint, :currency, :amount, :reason,
            :cancels_order, 'PENDING',
            now() + make_interval(secs => CAST(:lease AS double precision)))
    """
)


async def insert_refund(
    conn: AsyncConnection,
    *,
    payment: Payment,
    actor: str,
    request_id: str,
    fingerprint: str,
    amount: Money,
    reason: str,
    cancels_order: bool,
    lease: float,
) -> uuid.UUID:
    """Records a PENDING refund, kept from the reconciler for `lease` seconds; its id."""
    refund_id = uuid.uuid4()
    await conn.execute(
        _INSERT_REFUND,
        {
            "id": refund_id,
            "payment_id": uuid.UUID(payment.id),
            "actor": actor,
            "request_id": request_id,
            "fingerprint": fingerprint,
            "currency": amount.currency,
            "amount": amount.amount,
            "reason": reason,
            "cancels_order": cancels_order,
            "lease": lease,
        },
    )
    return refund_id


@dataclass(frozen=True, slots=True)
class RecordedRefund:
    """A PENDING refund a call recorded or found. `owned`: this call recorded it, so it
    holds the lease and alone sends it; otherwise it waits for the refund's outcome."""

    id: uuid.UUID
    owned: bool


def refund_failure(row: Any) -> Exception:
    """The error a FAILED refund answers with, to every retry."""
    return refund_refused(
        payment_id=str(row.payment_id),
        refund_id=str(row.id),
        provider_reference=row.intent_reference or "",
        failure_code=row.failure_code,
        failure_message=row.failure_message,
    )


def refund_conflict(error: IntegrityError, request_id: str) -> Exception:
    """What a unique violation while recording a refund means: decided by the index that
    refused it, whatever the order of concurrent callers."""
    if sqlstate(error) != UNIQUE_VIOLATION:
        return error
    constraint = getattr(getattr(error.orig, "diag", None), "constraint_name", "")
    if constraint == "refunds_one_pending_per_payment":
        return FailedPrecondition(
            "a refund of this payment is in progress; wait for its outcome",
            reason=ErrorReason.REFUND_IN_PROGRESS,
        )
    return RequestIdReused(request_id)  # the caller reused it, or raced itself


def replayed_refund(earlier: Any, request_id: str, fingerprint: str) -> RecordedRefund | None:
    """A retry's refund (a FIND_REFUND_REQUEST row): to wait for while PENDING, nothing to
    run once it succeeded, its error again if it failed."""
    check_replay(request_id, earlier.request_fingerprint, fingerprint)
    if earlier.status == RefundStatus.FAILED:
        raise refund_failure(earlier)
    return (
        RecordedRefund(earlier.id, owned=False) if earlier.status == RefundStatus.PENDING else None
    )
