"""Refunds: recording one, sending it to the provider, and applying what the provider did.

A refund is recorded PENDING first, then sent; the provider's answer is applied in one
transaction with everything it changes (the payment's refunded amount and, when it empties
a paid order's payment, the order's status and its stock). The reconciler resumes a refund
whose step did not finish.

One refund row makes at most one refund at the provider, whatever the concurrency, without
relying on the provider's idempotency keys: only the holder of the row's lease
(`next_check_time`) sends it. The call that records it holds the lease from the insert; a
retry, a concurrent cancel or the reconciler that finds it PENDING waits for its outcome,
and claims the lease only once it has run out (its sender died), then looks for the refund
at the provider (by its `refund_id` metadata) before sending it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.engine import autocommit_reads
from server.db.transactions import in_transaction
from server.domain.errors import (
    NotFound,
)
from server.domain.identity import Principal
from server.domain.money import Money
from server.domain.orders import OrderStatus, automatic_cancel_request_id
from server.domain.payments import (
    PAYMENT_UNKNOWN_FAILURE,
    Payment,
    RefundCompletion,
    RefundRequest,
    RefundStatus,
    payment_known_to_provider,
    refund_amount,
    refund_completion,
    refund_in_progress,
    refund_refused,
    to_minor_units,
)
from server.events.builders import order_cancelled, order_refunded, payment_refunded
from server.events.outbox import Outbox, OutboxEvent
from server.services.circuit import GuardedProvider
from server.services.orders.records import LOCK_ORDER, MARK_CANCELLED, SET_ORDER_STATUS
from server.services.payments.records import (
    FIND_REFUND_REQUEST,
    GET_PAYMENT,
    LOCK_PAYMENT,
    PENDING_REFUND_OF_PAYMENT,
    RecordedRefund,
    insert_refund,
    load_payment,
    payment_from_row,
    refund_conflict,
    refund_failure,
    replayed_refund,
)
from server.services.product_cache import ProductsChanged, no_cache
from server.services.providers import (
    PaymentUnknownToProvider,
    ProviderOutcomeUnknown,
    ProviderRefund,
    ProviderRejected,
    ProviderUnavailable,
)
from server.services.stock import release_stock

_log = structlog.get_logger("marketplace.payments")

_REFUND_TO_RUN = text(
    """
    SELECT r.id, r.payment_id, r.currency, r.amount, r.status, r.failure_code,
           r.failure_message, r.provider_reference AS refund_reference, p.order_id,
           p.provider_reference AS intent_reference, r.next_check_time <= now() AS lease_over
      FROM refunds r JOIN payments p ON p.id = r.payment_id
     WHERE r.id = :id
    """
)
# Taking over a refund whose sender's lease ran out; one caller wins it.
_CLAIM_REFUND = text(
    """
    UPDATE refunds
       SET next_check_time = now() + make_interval(secs => CAST(:lease AS double precision))
     WHERE id = :id AND status = 'PENDING' AND next_check_time <= now()
    RETURNING id
    """
)
# The provider was not reached: whoever retries may send it at once.
_RELEASE_REFUND = text(
    "UPDATE refunds SET next_check_time = now() WHERE id = :id AND status = 'PENDING'"
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
    UPDATE refunds SET status = 'FAILED', failure_code = :code, failure_message = :message,
                       next_check_time = NULL, update_time = now()
     WHERE id = :id AND status = 'PENDING'
    """
)
# The provider has the refund and finishes it later: its id says it was sent.
_RECHECK_REFUND_LATER = text(
    """
    UPDATE refunds
       SET update_time = now(), provider_reference = :reference,
           next_check_time = now() + make_interval(secs => CAST(:after AS double precision))
     WHERE id = :id AND status = 'PENDING'
    """
)
# How often a call polls a refund another call is sending: from the first to the last.
_WAIT_FIRST_SECONDS = 0.02
_WAIT_LONGEST_SECONDS = 0.5
_ADD_REFUNDED = text(
    """
    UPDATE payments SET amount_refunded = amount_refunded + :amount, status = :status,
                        update_time = now(), event_sequence = event_sequence + 1
     WHERE id = :id
    RETURNING event_sequence, update_time
    """
)


class Refunds:
    def __init__(
        self,
        engine: AsyncEngine,
        provider: GuardedProvider,
        *,
        lease_seconds: float,
        recheck_seconds: float,
        products_changed: ProductsChanged = no_cache,
        outbox: Outbox | None = None,
    ) -> None:
        """`lease_seconds`: how long a refund in flight keeps the reconciler (and concurrent
        callers) away; it must outlast a provider call with all its retries.
        `recheck_seconds`: when to ask again about a refund the provider has not finished."""
        self._engine = engine
        self._reads = autocommit_reads(engine)
        self._provider = provider
        self._lease_seconds = lease_seconds
        self._recheck_seconds = recheck_seconds
        self._products_changed = products_changed
        self._outbox = outbox or Outbox()

    async def refund_payment(self, principal: Principal, request: RefundRequest) -> Payment:
        """Refunds all or part of a succeeded payment (an admin's call)."""
        if request.outside_provider:
            return await self._refund_outside_provider(principal, request)
        await self._provider.raise_if_open()
        try:
            recorded = await in_transaction(
                self._engine, lambda conn: self._record_refund(conn, principal, request)
            )
        except IntegrityError as error:
            raise refund_conflict(error, request.request_id) from None
        await self.see_through(recorded)
        return await load_payment(self._reads, uuid.UUID(request.payment_id))

    async def _record_refund(
        self, conn: AsyncConnection, principal: Principal, request: RefundRequest
    ) -> RecordedRefund | None:
        """Records a PENDING refund; a retry finds its own. None when there is nothing to
        run (a retry of a refund that already succeeded); a retry of one the provider
        refused gets the same error again."""
        find = {"actor": principal.subject, "request_id": request.request_id}
        if (earlier := (await conn.execute(FIND_REFUND_REQUEST, find)).first()) is not None:
            return replayed_refund(earlier, request.request_id, request.fingerprint())
        payment_id = uuid.UUID(request.payment_id)
        current = (await conn.execute(GET_PAYMENT, {"id": payment_id})).first()
        if current is None:
            raise NotFound("payment", request.payment_id)
        await conn.execute(LOCK_ORDER, {"id": current.order_id})
        # A concurrent retry may have recorded it while this call waited for the lock.
        if (earlier := (await conn.execute(FIND_REFUND_REQUEST, find)).first()) is not None:
            return replayed_refund(earlier, request.request_id, request.fingerprint())
        payment = payment_from_row((await conn.execute(LOCK_PAYMENT, {"id": payment_id})).one())
        amount = refund_amount(payment, request.amount)
        to_minor_units(amount)
        pending = (
            await conn.execute(PENDING_REFUND_OF_PAYMENT, {"payment_id": payment_id})
        ).first()
        if pending is not None:
            raise refund_in_progress(payment.id)
        refund_id = await insert_refund(
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
        return RecordedRefund(refund_id, owned=True)

    async def _refund_outside_provider(
        self, principal: Principal, request: RefundRequest
    ) -> Payment:
        """Records a refund as made outside the provider, once the provider confirms it has
        no record of the payment: the way out for a payment it lost (its store was wiped,
        or it belongs to another account). Applied at once, like a refund the provider
        made, without ever reaching the provider."""
        payment_id = uuid.UUID(request.payment_id)
        async with self._reads.connect() as conn:
            earlier = (
                await conn.execute(
                    FIND_REFUND_REQUEST,
                    {"actor": principal.subject, "request_id": request.request_id},
                )
            ).first()
            current = (await conn.execute(GET_PAYMENT, {"id": payment_id})).first()
        if earlier is None:  # else a retry, answered by the transaction as the first call was
            if current is None:
                raise NotFound("payment", request.payment_id)
            payment = payment_from_row(current)
            refund_amount(payment, request.amount)  # refused before asking the provider
            await self._refuse_if_known_to_provider(payment)
        try:
            released = await in_transaction(
                self._engine, lambda conn: self._record_outside_refund(conn, principal, request)
            )
        except IntegrityError as error:
            raise refund_conflict(error, request.request_id) from None
        self._products_changed(released)
        return await load_payment(self._reads, payment_id)

    async def _refuse_if_known_to_provider(self, payment: Payment) -> None:
        if payment.provider_reference:
            try:
                await self._provider.retrieve_intent(payment.provider_reference)
            except PaymentUnknownToProvider:
                pass
            else:
                raise payment_known_to_provider(payment.id, payment.provider_reference)

    async def _record_outside_refund(
        self, conn: AsyncConnection, principal: Principal, request: RefundRequest
    ) -> list[str]:
        recorded = await self._record_refund(conn, principal, request)
        if recorded is None or not recorded.owned:
            return []  # a retry: recorded and applied by the first call
        return await self._apply_refund(conn, recorded.id, reference=None)

    async def see_through(self, refund: RecordedRefund | None) -> None:
        """Takes a recorded refund to its outcome: sends it when this call owns it, else
        waits for the call that does. Raises what the provider's refusal means."""
        if refund is None:
            return
        if refund.owned:
            await self.finish_refund(refund.id, sent_before=False)
        else:
            await self._await_outcome(refund.id)

    async def _await_outcome(self, refund_id: uuid.UUID) -> None:
        """Waits while the lease's holder sends the refund, at most a lease; takes the
        refund over when the lease runs out (its sender died). Returns with the refund as
        it stands when it has no outcome by then: the reconciler finishes it."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._lease_seconds
        pause = _WAIT_FIRST_SECONDS
        while True:
            async with self._reads.connect() as conn:
                row = (await conn.execute(_REFUND_TO_RUN, {"id": refund_id})).one()
            if row.status == RefundStatus.FAILED:
                raise refund_failure(row)
            if row.status != RefundStatus.PENDING or row.refund_reference is not None:
                return  # applied, or made and still pending at the provider
            if row.lease_over and await self._claim(refund_id):
                await self.finish_refund(refund_id, sent_before=True)
                return
            if loop.time() >= give_up:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, _WAIT_LONGEST_SECONDS)

    async def _claim(self, refund_id: uuid.UUID) -> bool:
        async with self._engine.begin() as conn:
            claimed = await conn.execute(
                _CLAIM_REFUND, {"id": refund_id, "lease": self._lease_seconds}
            )
            return claimed.first() is not None

    async def finish_refund(self, refund_id: uuid.UUID, *, sent_before: bool) -> None:
        """Sends a PENDING refund whose lease this caller holds and applies the answer.
        `sent_before`: an earlier holder may have reached the provider (it died, or its
        answer was lost), so the provider's refunds are looked at first; the refund is sent
        only if it is not there."""
        async with self._reads.connect() as conn:
            row = (await conn.execute(_REFUND_TO_RUN, {"id": refund_id})).one()
        if row.status != RefundStatus.PENDING:
            return
        try:
            refunded = await self._made_earlier(row) if sent_before else None
            if refunded is None:
                refunded = await self._provider.refund(
                    row.intent_reference,
                    amount_minor=to_minor_units(Money(row.currency, row.amount)),
                    metadata={
                        "refund_id": str(refund_id),
                        "payment_id": str(row.payment_id),
                        "order_id": str(row.order_id),
                    },
                    idempotency_key=str(refund_id),
                )
        except PaymentUnknownToProvider as unknown:
            _log.error(
                "the payment provider has no record of a payment we hold",
                payment_id=str(row.payment_id),
                provider_reference=row.intent_reference,
            )
            raise await self._refused(row, PAYMENT_UNKNOWN_FAILURE, unknown.message) from None
        except ProviderRejected as rejected:
            raise await self._refused(row, rejected.code, rejected.message) from None
        except ProviderOutcomeUnknown:
            _log.warning("refund outcome unknown", refund_id=str(refund_id))
            return
        except ProviderUnavailable:
            # Nothing reached the provider: a retry (or the reconciler) may send it now.
            async with self._engine.begin() as conn:
                await conn.execute(_RELEASE_REFUND, {"id": refund_id})
            raise
        await self.complete_refund(refund_id, refunded)

    async def _made_earlier(self, row: Any) -> ProviderRefund | None:
        """The provider's refund of this row, if an earlier sender made it."""
        for made in await self._provider.list_refunds(row.intent_reference):
            if made.metadata.get("refund_id") == str(row.id):
                return made
        return None

    async def _refused(self, row: Any, code: str, message: str) -> Exception:
        """Records the provider's refusal of the refund in `row`; the error it answers."""
        await self._fail(row.id, code, message)
        return refund_refused(
            payment_id=str(row.payment_id),
            refund_id=str(row.id),
            provider_reference=row.intent_reference or "",
            failure_code=code,
            failure_message=message,
        )

    async def _fail(self, refund_id: uuid.UUID, code: str, message: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(_FAIL_REFUND, {"id": refund_id, "code": code, "message": message})

    async def complete_refund(self, refund_id: uuid.UUID, refunded: ProviderRefund) -> None:
        """Applies a refund the provider made, exactly once (see the module's docstring)."""
        if refunded.status is RefundStatus.FAILED:
            await self._fail(refund_id, "refund_failed", "the provider failed the refund")
            return
        if refunded.status is RefundStatus.PENDING:
            # Still on its way (pending at the card network): the reconciler asks again.
            async with self._engine.begin() as conn:
                await conn.execute(
                    _RECHECK_REFUND_LATER,
                    {
                        "id": refund_id,
                        "reference": refunded.reference,
                        "after": self._recheck_seconds,
                    },
                )
            return
        released = await in_transaction(
            self._engine,
            lambda conn: self._apply_refund(conn, refund_id, reference=refunded.reference),
        )
        self._products_changed(released)

    async def _apply_refund(
        self, conn: AsyncConnection, refund_id: uuid.UUID, *, reference: str | None
    ) -> list[str]:
        """Applies a refund that was made (`reference`: the provider's id of it; None when
        it was made outside the provider). Returns the products whose stock came back."""
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
        await conn.execute(_COMPLETE_REFUND, {"id": refund_id, "reference": reference})
        refunded = (
            await conn.execute(
                _ADD_REFUNDED,
                {
                    "id": plan.payment_id,
                    "amount": amount.amount,
                    "status": completion.payment_status.value,
                },
            )
        ).one()
        events: list[OutboxEvent] = [
            payment_refunded(
                payment,
                refund_id=str(refund_id),
                amount=amount,
                sequence=refunded.event_sequence,
                occur_time=refunded.update_time,
            )
        ]
        if completion.order_status is not None:
            events.append(await self._end_order(conn, order, refund, payment, amount, completion))
        await self._outbox.append(conn, events)
        if completion.order_status is None or not completion.releases_stock:
            return []
        return await release_stock(conn, [order.id], self._outbox)

    async def _end_order(
        self,
        conn: AsyncConnection,
        order: Any,
        refund: Any,
        payment: Payment,
        amount: Money,
        completion: RefundCompletion,
    ) -> OutboxEvent:
        """Moves the order (a LOCK_ORDER row) to the status `refund` (a _LOCK_REFUND row),
        which emptied its payment, ends it in; the event that says so. `payment` is as it
        was before the refund."""
        assert completion.order_status is not None
        if completion.cancels_order:
            automatic = refund.request_id == automatic_cancel_request_id(str(order.id))
            changed = (
                await conn.execute(
                    MARK_CANCELLED,
                    {
                        "id": order.id,
                        "status": completion.order_status.value,
                        "request_id": None if automatic else refund.request_id,
                        "actor": refund.actor,
                    },
                )
            ).one()
            return order_cancelled(
                order_id=str(order.id),
                customer_id=order.customer_id,
                was_paid=True,
                sequence=changed.event_sequence,
                occur_time=changed.update_time,
            )
        changed = (
            await conn.execute(
                SET_ORDER_STATUS, {"id": order.id, "status": completion.order_status.value}
            )
        ).one()
        return order_refunded(
            order_id=str(order.id),
            customer_id=order.customer_id,
            payment_id=payment.id,
            amount_refunded=Money(amount.currency, payment.amount_refunded.amount + amount.amount),
            was_shipped=OrderStatus(order.status) is OrderStatus.SHIPPED,
            sequence=changed.event_sequence,
            occur_time=changed.update_time,
        )
