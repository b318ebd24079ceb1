"""Background work every server process runs: expiring unpaid orders and reconciling
payments and refunds whose outcome is not known yet.

Safe with any number of processes and replicas: each pass claims a bounded batch with
`FOR UPDATE SKIP LOCKED`, so two processes never take the same row, and every change is
conditional on the row still being in the state the pass saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import uuid
from collections.abc import Awaitable, Callable

import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.transactions import in_transaction
from server.domain.errors import FailedPrecondition
from server.domain.orders import OrderEvent, OrderStatus, next_status, releases_stock
from server.events.builders import order_expired, payment_failed
from server.events.outbox import Outbox
from server.services.circuit import GuardedProvider
from server.services.payments.records import PAYMENT_COLUMNS, payment_from_row
from server.services.payments.refunds import Refunds
from server.services.payments.settlement import Settlement
from server.services.providers import (
    IntentStatus,
    ProviderError,
    ProviderRejected,
)
from server.services.stock import payments_in_flight, release_stock

_log = structlog.get_logger("marketplace.upkeep")
# A payment's failure_code when it was never confirmed in time.
_ABANDONED = "abandoned"

# Orders whose payment window closed, with no payment in flight (its charge may still
# succeed; the reconciler settles it first). Locked here, skipped by other processes.
_CLAIM_EXPIRED_ORDERS = text(
    """
    SELECT o.id FROM orders o
     WHERE o.status = 'PENDING_PAYMENT' AND o.expire_time <= now()
       AND NOT EXISTS (SELECT 1 FROM payments p
                        WHERE p.order_id = o.id AND p.status = 'PENDING')
     ORDER BY o.expire_time
     LIMIT :limit
       FOR UPDATE OF o SKIP LOCKED
    """
)
_MARK_EXPIRED = text(
    """
    UPDATE orders SET status = :status, update_time = now(), event_sequence = event_sequence + 1
     WHERE id = ANY(:ids) AND status = 'PENDING_PAYMENT'
    RETURNING id, customer_id, event_sequence, update_time
    """
)
# Claiming pushes the lease forward, so the row is not claimed again while it is worked on.
_CLAIM_PAYMENTS = text(
    """
    UPDATE payments
       SET next_check_time = now() + make_interval(secs => CAST(:lease AS double precision))
     WHERE id IN (SELECT id FROM payments
                   WHERE status = 'PENDING' AND next_check_time <= now()
                   ORDER BY next_check_time LIMIT :limit
                     FOR UPDATE SKIP LOCKED)
    RETURNING id, provider_reference,
              (SELECT o.expire_time <= now() FROM orders o WHERE o.id = order_id)
              AS window_closed
    """
)
_ABANDON_UNSENT_PAYMENT = text(
    f"""
    UPDATE payments SET status = 'FAILED', failure_code = :code,
                        failure_message = :message, next_check_time = NULL, update_time = now(),
                        event_sequence = event_sequence + 1
     WHERE id = :id AND status = 'PENDING' AND provider_reference IS NULL
    RETURNING {PAYMENT_COLUMNS}, event_sequence
    """
)
_CLAIM_REFUNDS = text(
    """
    UPDATE refunds
       SET next_check_time = now() + make_interval(secs => CAST(:lease AS double precision))
     WHERE id IN (SELECT id FROM refunds
                   WHERE status = 'PENDING' AND next_check_time <= now()
                   ORDER BY next_check_time LIMIT :limit
                     FOR UPDATE SKIP LOCKED)
    RETURNING id
    """
)


class Upkeep:
    def __init__(
        self,
        engine: AsyncEngine,
        settlement: Settlement,
        refunds: Refunds,
        provider: GuardedProvider,
        *,
        batch_size: int,
        lease_seconds: float,
        outbox: Outbox | None = None,
    ) -> None:
        self._engine = engine
        self._outbox = outbox or Outbox()
        self._settlement = settlement
        self._refunds = refunds
        self._provider = provider
        self._batch_size = batch_size
        self._lease_seconds = lease_seconds

    async def expire_orders(self) -> int:
        """Expires one batch of unpaid orders, releasing their stock; returns how many."""
        return await in_transaction(self._engine, self._expire_batch)

    async def _expire_batch(self, conn: AsyncConnection) -> int:
        rows = (await conn.execute(_CLAIM_EXPIRED_ORDERS, {"limit": self._batch_size})).all()
        if not rows:
            return 0
        # The claim's NOT EXISTS saw the payments as of its snapshot; a payment committed
        # between that snapshot and our row lock is seen only by a new statement. Its order
        # stays for the reconciler to settle first.
        paying = await payments_in_flight(conn, [row.id for row in rows])
        ids = [row.id for row in rows if row.id not in paying]
        if not ids:
            return 0
        current = OrderStatus.PENDING_PAYMENT
        target = next_status("*", current, OrderEvent.PAYMENT_WINDOW_CLOSED)
        expired = (await conn.execute(_MARK_EXPIRED, {"ids": ids, "status": target.value})).all()
        await self._outbox.append(
            conn,
            [
                order_expired(
                    order_id=str(row.id),
                    customer_id=row.customer_id,
                    sequence=row.event_sequence,
                    occur_time=row.update_time,
                )
                for row in expired
            ],
        )
        if releases_stock(current, target):
            await release_stock(conn, ids, self._outbox)
        return len(ids)

    async def reconcile_payments(self) -> int:
        """Asks the provider about payments left PENDING past their lease."""
        async with self._engine.begin() as conn:
            claimed = (
                await conn.execute(
                    _CLAIM_PAYMENTS, {"lease": self._lease_seconds, "limit": self._batch_size}
                )
            ).all()
        for row in claimed:
            try:
                await self._reconcile_payment(row.id, row.provider_reference, row.window_closed)
            except ProviderError as error:
                # Left PENDING; the lease runs out and a later pass asks again.
                _log.warning(
                    "payment reconciliation deferred", payment_id=str(row.id), error=repr(error)
                )
        return len(claimed)

    async def _reconcile_payment(
        self, payment_id: uuid.UUID, reference: str | None, window_closed: bool
    ) -> None:
        if reference is None:
            # No intent was recorded, so none was ever confirmed: nothing was charged.
            async with self._engine.begin() as conn:
                abandoned = (
                    await conn.execute(
                        _ABANDON_UNSENT_PAYMENT,
                        {
                            "id": payment_id,
                            "code": _ABANDONED,
                            "message": "the payment never reached the provider",
                        },
                    )
                ).first()
                if abandoned is not None:
                    event = payment_failed(
                        payment_from_row(abandoned),
                        failure_code=abandoned.failure_code,
                        failure_message=abandoned.failure_message,
                        sequence=abandoned.event_sequence,
                        occur_time=abandoned.update_time,
                    )
                    await self._outbox.append(conn, [event])
            return
        intent = await self._provider.retrieve_intent(reference)
        stuck = intent.status is IntentStatus.PROCESSING and window_closed
        if intent.status is IntentStatus.REQUIRES_CONFIRMATION or stuck:
            # Our confirm never arrived and its caller is long gone, or the charge still
            # waits (on the customer's 3-D Secure, say) after the order's payment window
            # closed: make sure the intent can never be charged, then record the payment as
            # failed, so the order can expire and its stock go back on sale. An intent the
            # provider will not cancel (it is charging it now) is settled as it stands.
            try:
                intent = await self._provider.cancel_intent(
                    reference, idempotency_key=f"{payment_id}:cancel"
                )
            except ProviderRejected:
                intent = await self._provider.retrieve_intent(reference)  # confirmed after all
            if intent.status is IntentStatus.FAILED:
                intent = dataclasses.replace(
                    intent,
                    failure_code=_ABANDONED,
                    failure_message="the payment was not confirmed in time",
                )
        await self._settlement.settle_payment(payment_id, intent)

    async def reconcile_refunds(self) -> int:
        """Finishes refunds left PENDING past their lease (including the refund step of a
        paid order's cancellation): applies the provider's refund if an earlier sender made
        it, else sends it now (the claim holds the lease, so nobody else sends it)."""
        async with self._engine.begin() as conn:
            claimed = (
                await conn.execute(
                    _CLAIM_REFUNDS, {"lease": self._lease_seconds, "limit": self._batch_size}
                )
            ).all()
        for row in claimed:
            try:
                await self._refunds.finish_refund(row.id, sent_before=True)
            except (ProviderError, FailedPrecondition) as error:
                # Left PENDING (or failed, if refused); a later pass looks again.
                _log.warning(
                    "refund reconciliation deferred", refund_id=str(row.id), error=repr(error)
                )
            except Exception:  # one refund's trouble must not stop the others
                _log.exception("refund reconciliation failed", refund_id=str(row.id))
        return len(claimed)

    async def run_forever(self, interval_seconds: float) -> None:
        """Runs every pass, then sleeps a jittered interval (so processes spread out)."""
        passes: list[tuple[str, Callable[[], Awaitable[int]]]] = [
            ("expired_orders", self.expire_orders),
            ("reconciled_payments", self.reconcile_payments),
            ("reconciled_refunds", self.reconcile_refunds),
        ]
        while True:
            for name, run_pass in passes:
                try:
                    count = await run_pass()
                except DBAPIError as error:  # the database is away: the next pass retries
                    _log.warning("upkeep pass failed", upkeep=name, error=repr(error))
                    continue
                except Exception:  # the loop outlives any one failure, and says what it was
                    _log.exception("upkeep pass failed", upkeep=name)
                    continue
                if count:
                    _log.info("upkeep", **{name: count})
            await asyncio.sleep(interval_seconds * random.uniform(0.5, 1.5))


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
