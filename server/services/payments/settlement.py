"""Settling a payment: applying the provider's word on its charge (from the charging call,
a webhook or the reconciler), exactly once."""

from __future__ import annotations

import dataclasses
import uuid

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.engine import autocommit_reads
from server.db.transactions import in_transaction
from server.domain.orders import OrderStatus
from server.domain.payments import (
    ChargeOutcome,
    IntentStatus,
    Payment,
    PaymentStatus,
    fingerprint_of,
    from_minor_units,
    revives,
    settlement,
)
from server.events.builders import (
    fulfilment_requested,
    order_paid,
    payment_failed,
    payment_succeeded,
)
from server.events.outbox import Outbox, OutboxEvent
from server.services.orders.records import LOCK_ORDER, SET_ORDER_STATUS, load_order
from server.services.payments.records import (
    GET_PAYMENT,
    LOCK_PAYMENT,
    insert_refund,
    load_payment,
    payment_from_row,
)
from server.services.providers import ProviderIntent

_log = structlog.get_logger("marketplace.payments")

_SETTLE_PAYMENT = text(
    """
    UPDATE payments SET status = :status, failure_code = :code, failure_message = :message,
                        next_check_time = NULL, update_time = now(),
                        event_sequence = event_sequence + 1
     WHERE id = :id
    RETURNING event_sequence, update_time
    """
)
_RECHECK_PAYMENT_LATER = text(
    """
    UPDATE payments
       SET update_time = now(),
           next_check_time = now() + make_interval(secs => CAST(:after AS double precision))
     WHERE id = :id
    """
)
_OTHER_LIVE_PAYMENT = text(
    """
    SELECT id FROM payments
     WHERE order_id = :order_id AND id <> CAST(:id AS uuid)
       AND status IN ('PENDING', 'SUCCEEDED', 'REFUNDED', 'PARTIALLY_REFUNDED')
    """
)
_REOPEN_PAYMENT = text(
    """
    UPDATE payments SET status = 'PENDING', failure_code = '', failure_message = '',
                        update_time = now()
     WHERE id = :id AND status = 'FAILED'
    """
)
# Money taken for an order that can no longer be paid goes back under this actor.
_AUTOMATIC_REFUND_ACTOR = "system"


def charge_outcome(intent: ProviderIntent) -> ChargeOutcome:
    charged = (
        from_minor_units(intent.currency, intent.amount_minor)
        if intent.status is IntentStatus.SUCCEEDED
        else None
    )
    return ChargeOutcome(intent.status, charged, intent.failure_code, intent.failure_message)


class Settlement:
    def __init__(
        self, engine: AsyncEngine, *, recheck_seconds: float, outbox: Outbox | None = None
    ) -> None:
        """`recheck_seconds`: when to look again at a payment the provider is still
        processing."""
        self._engine = engine
        self._outbox = outbox or Outbox()
        self._reads = autocommit_reads(engine)
        self._recheck_seconds = recheck_seconds

    async def settle_payment(self, payment_id: uuid.UUID, intent: ProviderIntent) -> Payment:
        """Applies the provider's word on a payment and returns the payment as it stands."""
        await in_transaction(self._engine, lambda conn: self.settle_in(conn, payment_id, intent))
        return await load_payment(self._reads, payment_id)

    async def settle_failure(self, payment_id: str, code: str, message: str) -> Payment:
        """Settles a payment whose charge the provider refused outright."""
        failed = ProviderIntent(
            reference="",
            status=IntentStatus.FAILED,
            amount_minor=0,
            currency="",
            failure_code=code,
            failure_message=message,
        )
        return await self.settle_payment(uuid.UUID(payment_id), failed)

    async def settle_in(
        self, conn: AsyncConnection, payment_id: uuid.UUID, intent: ProviderIntent
    ) -> None:
        """Settlement inside the caller's transaction (a webhook's, which records the event
        in the same one)."""
        current = (await conn.execute(GET_PAYMENT, {"id": payment_id})).one()
        order = (await conn.execute(LOCK_ORDER, {"id": current.order_id})).one()
        payment = payment_from_row((await conn.execute(LOCK_PAYMENT, {"id": payment_id})).one())
        outcome = charge_outcome(intent)
        other_live = None
        if revives(payment, outcome):
            other_live = (
                await conn.execute(_OTHER_LIVE_PAYMENT, {"order_id": order.id, "id": payment.id})
            ).first()
        plan = settlement(
            payment, OrderStatus(order.status), outcome, other_live_payment=other_live is not None
        )
        if plan.alarm:
            _log.error(
                plan.alarm,
                payment_id=payment.id,
                order_id=str(order.id),
                live_payment_id=str(other_live.id) if other_live is not None else None,
                charged=f"{outcome.charged.amount} {outcome.charged.currency}"
                if outcome.charged is not None
                else None,
                expected=f"{payment.amount.amount} {payment.amount.currency}",
            )
        if plan.reopen:
            _log.warning("a failed payment was charged after all", payment_id=payment.id)
            await conn.execute(_REOPEN_PAYMENT, {"id": payment_id})
        if plan.recheck_later:
            await conn.execute(
                _RECHECK_PAYMENT_LATER, {"id": payment_id, "after": self._recheck_seconds}
            )
        events: list[OutboxEvent] = []
        if plan.settle_as is not None:
            settled = (
                await conn.execute(
                    _SETTLE_PAYMENT,
                    {
                        "id": payment_id,
                        "status": plan.settle_as.value,
                        "code": plan.failure_code,
                        "message": plan.failure_message,
                    },
                )
            ).one()
            if plan.settle_as is PaymentStatus.SUCCEEDED:
                charged = dataclasses.replace(
                    payment, provider_reference=payment.provider_reference or intent.reference
                )
                events.append(
                    payment_succeeded(
                        charged, sequence=settled.event_sequence, occur_time=settled.update_time
                    )
                )
            else:
                events.append(
                    payment_failed(
                        payment,
                        failure_code=plan.failure_code,
                        failure_message=plan.failure_message,
                        sequence=settled.event_sequence,
                        occur_time=settled.update_time,
                    )
                )
        if plan.order_status is not None:
            changed = (
                await conn.execute(
                    SET_ORDER_STATUS, {"id": order.id, "status": plan.order_status.value}
                )
            ).one()
            # Settlement only ever moves an order to PAID (settlement() decides).
            paid = await load_order(conn, order.id)
            events += [
                order_paid(
                    order_id=paid.id,
                    customer_id=paid.customer_id,
                    payment_id=payment.id,
                    amount=payment.amount,
                    sequence=changed.event_sequence,
                    occur_time=changed.update_time,
                ),
                fulfilment_requested(
                    order_id=paid.id,
                    customer_id=paid.customer_id,
                    lines=paid.lines,
                    occur_time=changed.update_time,
                ),
            ]
        await self._outbox.append(conn, events)
        if plan.refund_in_full:
            await insert_refund(
                conn,
                payment=payment,
                actor=_AUTOMATIC_REFUND_ACTOR,
                request_id=f"auto-refund:{payment.id}",
                fingerprint=fingerprint_of(f"auto-refund;{payment.id}"),
                amount=payment.amount,
                reason="payment arrived for an order that is not payable",
                cancels_order=False,
                lease=0.0,
            )
