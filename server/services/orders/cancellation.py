"""Cancelling an order: a pending one at once, a paid one by refunding its payment first.

A pending order is cancelled and its stock released in one transaction. A paid one is a
saga: a refund is recorded, sent to the provider, then applied together with the
cancellation and the stock release (server/services/payments/refunds.py); the reconciler
resumes it after a crash.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.engine import autocommit_reads
from server.db.transactions import UNIQUE_VIOLATION, in_transaction, sqlstate
from server.domain.errors import (
    ErrorReason,
    FailedPrecondition,
    RequestIdReused,
)
from server.domain.identity import Principal
from server.domain.orders import Cancellation, CancelRequest, Order, OrderStatus, cancellation
from server.domain.payments import Payment, payment_in_progress, refund_in_progress
from server.events.builders import order_cancelled
from server.events.outbox import Outbox
from server.services.circuit import GuardedProvider
from server.services.orders.records import (
    LOCK_ORDER,
    MARK_CANCELLED,
    load_order,
    load_visible_order,
)
from server.services.payments.records import (
    FIND_REFUND_REQUEST,
    PAYMENT_COLUMNS,
    PENDING_REFUND_OF_PAYMENT,
    RecordedRefund,
    insert_refund,
    payment_from_row,
    refund_conflict,
    replayed_refund,
)
from server.services.payments.refunds import Refunds
from server.services.product_cache import ProductsChanged, no_cache
from server.services.stock import payments_in_flight, release_stock

# A cancel request id is taken by a cancelled order, or by a paid order's cancellation still
# refunding (it takes the id when its refund completes).
_FIND_CANCELLATION = text(
    """
    SELECT id FROM orders WHERE cancelled_by = :actor AND cancel_request_id = :request_id
    UNION ALL
    SELECT p.order_id FROM refunds r JOIN payments p ON p.id = r.payment_id
     WHERE r.actor = :actor AND r.request_id = :request_id AND r.cancels_order
    """
)
_PAID_PAYMENT_OF_ORDER = text(
    f"""
    SELECT {PAYMENT_COLUMNS} FROM payments
     WHERE order_id = :order_id AND status IN ('SUCCEEDED', 'PARTIALLY_REFUNDED') FOR UPDATE
    """
)


class OrderCancellation:
    def __init__(
        self,
        engine: AsyncEngine,
        provider: GuardedProvider,
        refunds: Refunds,
        *,
        lease_seconds: float,
        products_changed: ProductsChanged = no_cache,
        outbox: Outbox | None = None,
    ) -> None:
        """`lease_seconds`: how long a cancellation's refund in flight keeps the reconciler
        away; it must outlast a provider call with all its retries."""
        self._engine = engine
        self._outbox = outbox or Outbox()
        self._reads = autocommit_reads(engine)
        self._provider = provider
        self._refunds = refunds
        self._lease_seconds = lease_seconds
        self._products_changed = products_changed

    async def cancel_order(self, principal: Principal, request: CancelRequest) -> Order:
        """Cancels the order and answers with it as it stands after the cancel.

        A `request_id` this caller already used to cancel another order is RequestIdReused;
        the unique (cancelled_by, cancel_request_id) index decides concurrent attempts.
        """
        try:
            plan, order, released = await in_transaction(
                self._engine, lambda conn: self._cancel_unless_paid(conn, principal, request)
            )
        except IntegrityError as error:
            if sqlstate(error) == UNIQUE_VIOLATION:
                raise RequestIdReused(request.request_id) from None
            raise
        self._products_changed(released)
        if plan is not Cancellation.REFUND_FIRST:
            return order
        return await self._cancel_paid(principal, request)

    async def _cancel_unless_paid(
        self, conn: AsyncConnection, principal: Principal, request: CancelRequest
    ) -> tuple[Cancellation, Order, list[str]]:
        """Cancels a pending order; the plan, the order, and the products whose stock came
        back (none when it was cancelled already, or is paid and must be refunded first)."""
        if request.request_id:
            previous = (
                await conn.execute(
                    _FIND_CANCELLATION,
                    {"actor": principal.subject, "request_id": request.request_id},
                )
            ).all()
            if any(str(row.id) != request.order_id for row in previous):
                raise RequestIdReused(request.request_id)
        order = await load_visible_order(conn, principal, request.order_id, lock=True)
        plan = cancellation(order.id, order.status)
        if plan is not Cancellation.RELEASE_NOW:
            return plan, order, []
        in_flight = await payments_in_flight(conn, [uuid.UUID(order.id)])
        if in_flight:
            # Its charge may still succeed: cancelling now could keep money for nothing.
            raise payment_in_progress(order.id, str(next(iter(in_flight.values()))))
        cancelled = (
            await conn.execute(
                MARK_CANCELLED,
                {
                    "id": uuid.UUID(order.id),
                    "status": OrderStatus.CANCELLED.value,
                    "request_id": request.request_id or None,
                    "actor": principal.subject,
                },
            )
        ).one()
        event = order_cancelled(
            order_id=order.id,
            customer_id=order.customer_id,
            was_paid=False,
            sequence=cancelled.event_sequence,
            occur_time=cancelled.update_time,
        )
        await self._outbox.append(conn, [event])
        released = await release_stock(conn, [uuid.UUID(order.id)], self._outbox)
        return plan, await load_order(conn, uuid.UUID(order.id)), released

    async def _cancel_paid(self, principal: Principal, request: CancelRequest) -> Order:
        await self._provider.raise_if_open()
        try:
            recorded = await in_transaction(
                self._engine, lambda conn: self._record_refund(conn, principal, request)
            )
        except IntegrityError as error:
            raise refund_conflict(error, request.refund_request_id()) from None
        await self._refunds.see_through(recorded)
        async with self._reads.connect() as conn:
            return await load_visible_order(conn, principal, request.order_id, lock=False)

    async def _record_refund(
        self, conn: AsyncConnection, principal: Principal, request: CancelRequest
    ) -> RecordedRefund | None:
        """Records the cancellation's PENDING refund, or finds the one another cancel of the
        order recorded; None when there is nothing to run (cancelled meanwhile, or a retry
        that already has its outcome)."""
        order = (await conn.execute(LOCK_ORDER, {"id": uuid.UUID(request.order_id)})).one()
        if OrderStatus(order.status) is not OrderStatus.PAID:
            return None  # cancelled meanwhile (a concurrent retry finished first)
        key = request.refund_request_id()
        earlier = (
            await conn.execute(FIND_REFUND_REQUEST, {"actor": principal.subject, "request_id": key})
        ).first()
        if earlier is not None:
            # A refused refund answers its error again: the order is still PAID, and OK would
            # claim a cancellation that did not happen.
            return replayed_refund(earlier, key, request.fingerprint())
        payment = await _lock_paid_payment(conn, order.id)
        pending = (
            await conn.execute(PENDING_REFUND_OF_PAYMENT, {"payment_id": uuid.UUID(payment.id)})
        ).first()
        if pending is not None:
            if pending.cancels_order:
                # another caller's cancellation: its outcome is this one's
                return RecordedRefund(pending.id, owned=False)
            raise refund_in_progress(payment.id)
        refund_id = await insert_refund(
            conn,
            payment=payment,
            actor=principal.subject,
            request_id=key,
            fingerprint=request.fingerprint(),
            amount=payment.refundable,
            reason="order cancelled",
            cancels_order=True,
            lease=self._lease_seconds,
        )
        return RecordedRefund(refund_id, owned=True)


async def _lock_paid_payment(conn: AsyncConnection, order_id: uuid.UUID) -> Payment:
    row = (await conn.execute(_PAID_PAYMENT_OF_ORDER, {"order_id": order_id})).first()
    if row is None:
        raise FailedPrecondition(
            f"order {order_id} is paid but has no refundable payment",
            reason=ErrorReason.PAYMENT_NOT_REFUNDABLE,
            metadata={"orderId": str(order_id)},
        )
    return payment_from_row(row)
