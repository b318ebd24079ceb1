"""Refunds: recording one, sending it to the provider, and applying what the provider did.

A refund is recorded PENDING first, then sent; the provider's answer is applied in one
transaction with everything it changes (the payment's refunded amount and, when it empties
a paid order's payment, the order's status and its stock). The reconciler resumes a refund
whose step did not finish.
"""

from __future__ import annotations

import uuid

import structlog
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.transactions import UNIQUE_VIOLATION, in_transaction, sqlstate
from server.domain.errors import (
    ErrorReason,
    FailedPrecondition,
    NotFound,
    RequestIdReused,
    check_replay,
)
from server.domain.identity import Principal
from server.domain.money import Money
from server.domain.orders import OrderStatus, automatic_cancel_request_id
from server.domain.payments import (
    Payment,
    RefundRequest,
    RefundStatus,
    refund_amount,
    refund_completion,
    refund_in_progress,
    to_minor_units,
)
from server.services.circuit import GuardedProvider
from server.services.orders.records import LOCK_ORDER, MARK_CANCELLED, SET_ORDER_STATUS
from server.services.payments.records import (
    FIND_REFUND_REQUEST,
    GET_PAYMENT,
    LOCK_PAYMENT,
    PENDING_REFUND_OF_PAYMENT,
    load_payment,
    payment_from_row,
)
from server.services.product_cache import ProductsChanged, no_cache
from server.services.providers import ProviderOutcomeUnknown, ProviderRefund, ProviderRejected
from server.services.stock import release_stock

_log = structlog.get_logger("marketplace.payments")

_INSERT_REFUND = text(
    """
    INSERT INTO refunds (id, payment_id, actor, request_id, request_fingerprint, currency,
                         amount, reason, cancels_order, status, next_check_time)
    VALUES (:id, :payment_id, :actor, :request_id, :fingerprint, :currency, :amount, :reason,
            :cancels_order, 'PENDING',
            now() + make_interval(secs => CAST(:lease AS double precision)))
    """
)
_REFUND_TO_RUN = text(
    """
    SELECT r.id, r.payment_id, r.currency, r.amount, r.status, p.order_id,
           p.provider_reference
      FROM refunds r JOIN payments p ON p.id = r.payment_id
     WHERE r.id = :id
    """
)
_LOCK_REFUND = text(
    """
    SELECT id, payment_id, actor, request_id, currency, amount, cancels_order, status
      FROM refunds WHERE id = :id FOR UPDATE
    """
)
_COMPLETE_REFUND = text(
    """
    UPDATE refunds SET status = 'SUCCEEDED', provider_reference = :reference,
                       next_check_time = NULL, update_time = now()
     WHERE id = :id
    """
)
_FAIL_REFUND = text(
    """
    UPDATE refunds SET status = 'FAILED', failure_message = :message, next_check_time = NULL,
                       update_time = now()
     WHERE id = :id AND status = 'PENDING'
    """
)
_RECHECK_REFUND_LATER = text(
    """
    UPDATE refunds
       SET update_time = now(),
           next_check_time = now() + make_interval(secs => CAST(:after AS double precision))
     WHERE id = :id AND status = 'PENDING'
    """
)
_ADD_REFUNDED = text(
    """
    UPDATE payments SET amount_refunded = amount_refunded + :amount, status = :status,
                        update_time = now()
     WHERE id = :id
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


class Refunds:
    def __init__(
        self,
        engine: AsyncEngine,
        provider: GuardedProvider,
        *,
        lease_seconds: float,
        recheck_seconds: float,
        products_changed: ProductsChanged = no_cache,
    ) -> None:
        """`lease_seconds`: how long a refund in flight keeps the reconciler away; it must
        outlast a provider call with all its retries. `recheck_seconds`: when to ask again
        about a refund the provider has not finished."""
        self._engine = engine
        self._reads = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._provider = provider
        self._lease_seconds = lease_seconds
        self._recheck_seconds = recheck_seconds
        self._products_changed = products_changed

    async def refund_payment(self, principal: Principal, request: RefundRequest) -> Payment:
        """Refunds all or part of a succeeded payment (an admin's call)."""
        await self._provider.raise_if_open()
        try:
            refund_id = await in_transaction(
                self._engine, lambda conn: self._record_refund(conn, principal, request)
            )
        except IntegrityError as error:
            raise refund_conflict(error, request.request_id) from None
        if refund_id is not None:
            await self.run_refund(refund_id)
        return await load_payment(self._reads, uuid.UUID(request.payment_id))

    async def _record_refund(
        self, conn: AsyncConnection, principal: Principal, request: RefundRequest
    ) -> uuid.UUID | None:
        """Records a PENDING refund and returns its id; None when there is nothing to run
        (a retry of a refund that already has its outcome)."""
        earlier = (
            await conn.execute(
                FIND_REFUND_REQUEST,
                {"actor": principal.subject, "request_id": request.request_id},
            )
        ).first()
        if earlier is not None:
            check_replay(request.request_id, earlier.request_fingerprint, request.fingerprint())
            return earlier.id if earlier.status == RefundStatus.PENDING else None
        payment_id = uuid.UUID(request.payment_id)
        current = (await conn.execute(GET_PAYMENT, {"id": payment_id})).first()
        if current is None:
            raise NotFound("payment", request.payment_id)
        await conn.execute(LOCK_ORDER, {"id": current.order_id})
        payment = payment_from_row((await conn.execute(LOCK_PAYMENT, {"id": payment_id})).one())
        amount = refund_amount(payment, request.amount)
        to_minor_units(amount)
        pending = (
            await conn.execute(PENDING_REFUND_OF_PAYMENT, {"payment_id": payment_id})
        ).first()
        if pending is not None:
            raise refund_in_progress(payment.id)
        return await insert_refund(
            conn,
            payment=payment,
            actor=principal.subject,
            request_id=request.request_id,
            fingerprint=request.fingerprint(),
            amount=amount,
            reason=request.reason,
            cancels_order=False,
            lease=self._lease_seconds,
        )

    async def run_refund(self, refund_id: uuid.UUID) -> None:
        """Sends a PENDING refund to the provider and applies the answer. Safe to run again:
        the adapter looks for the refund at the provider before sending it twice."""
        async with self._reads.connect() as conn:
            row = (await conn.execute(_REFUND_TO_RUN, {"id": refund_id})).one()
        if row.status != RefundStatus.PENDING:
            return
        amount = Money(row.currency, row.amount)
        try:
            refunded = await self._provider.refund(
                row.provider_reference,
                amount_minor=to_minor_units(amount),
                metadata={
                    "refund_id": str(refund_id),
                    "payment_id": str(row.payment_id),
                    "order_id": str(row.order_id),
                },
                idempotency_key=str(refund_id),
            )
        except ProviderRejected as rejected:
            async with self._engine.begin() as conn:
                await conn.execute(_FAIL_REFUND, {"id": refund_id, "message": rejected.message})
            raise FailedPrecondition(
                f"the payment provider refused the refund: {rejected.message}",
                reason=ErrorReason.REFUND_REJECTED,
                metadata={"paymentId": str(row.payment_id), "providerCode": rejected.code},
            ) from None
        except ProviderOutcomeUnknown:
            _log.warning("refund outcome unknown", refund_id=str(refund_id))
            return
        await self.complete_refund(refund_id, refunded)

    async def complete_refund(self, refund_id: uuid.UUID, refunded: ProviderRefund) -> None:
        """Applies a refund the provider made, exactly once (see the module's docstring)."""
        if refunded.status is RefundStatus.FAILED:
            async with self._engine.begin() as conn:
                await conn.execute(
                    _FAIL_REFUND, {"id": refund_id, "message": "the provider failed the refund"}
                )
            return
        if refunded.status is RefundStatus.PENDING:
            # Still on its way (pending at the card network): the reconciler asks again.
            async with self._engine.begin() as conn:
                await conn.execute(
                    _RECHECK_REFUND_LATER, {"id": refund_id, "after": self._recheck_seconds}
                )
            return
        released = await in_transaction(
            self._engine, lambda conn: self._apply_refund(conn, refund_id, refunded)
        )
        self._products_changed(released)

    async def _apply_refund(
        self, conn: AsyncConnection, refund_id: uuid.UUID, refunded: ProviderRefund
    ) -> list[str]:
        """Returns the products whose stock came back."""
        plan = (await conn.execute(_REFUND_TO_RUN, {"id": refund_id})).one()
        order = (await conn.execute(LOCK_ORDER, {"id": plan.order_id})).one()
        payment = payment_from_row(
            (await conn.execute(LOCK_PAYMENT, {"id": plan.payment_id})).one()
        )
        refund = (await conn.execute(_LOCK_REFUND, {"id": refund_id})).one()
        if refund.status != RefundStatus.PENDING:
            return []  # applied already (by the call, or the reconciler): once only
        amount = Money(refund.currency, refund.amount)
        completion = refund_completion(
            payment, amount, OrderStatus(order.status), cancels_order=refund.cancels_order
        )
        await conn.execute(_COMPLETE_REFUND, {"id": refund_id, "reference": refunded.reference})
        await conn.execute(
            _ADD_REFUNDED,
            {
                "id": plan.payment_id,
                "amount": amount.amount,
                "status": completion.payment_status.value,
            },
        )
        if completion.order_status is None:
            return []
        released = await release_stock(conn, [order.id]) if completion.releases_stock else []
        if completion.cancels_order:
            automatic = refund.request_id == automatic_cancel_request_id(str(order.id))
            await conn.execute(
                MARK_CANCELLED,
                {
                    "id": order.id,
                    "status": completion.order_status.value,
                    "request_id": None if automatic else refund.request_id,
                    "actor": refund.actor,
                },
            )
        else:
            await conn.execute(
                SET_ORDER_STATUS, {"id": order.id, "status": completion.order_status.value}
            )
        return released
