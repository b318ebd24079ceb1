"""Provider events (webhooks): each applied once, in the transaction that records it.

An event is only a hint of which charge to look at: whoever holds the endpoint's secret can
sign one. The charge is read back from the provider by its id, with no transaction open,
and what the provider says is settled. It is read only when it could change our payment: a
pending one, or a failed one the event says succeeded (a charge we took for declined that
went through). An event about a charge that is not ours, or that could change nothing, is
recorded and changes nothing.
"""

from __future__ import annotations

import uuid

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.engine import autocommit_reads
from server.db.transactions import in_transaction
from server.domain.payments import PaymentStatus
from server.services.circuit import GuardedProvider
from server.services.payments.settlement import Settlement
from server.services.providers import PaymentUnknownToProvider, ProviderEvent, ProviderIntent

_log = structlog.get_logger("marketplace.payments")

_RECORD_EVENT = text(
    """
    INSERT INTO provider_events (id, type) VALUES (:id, :type)
    ON CONFLICT (id) DO NOTHING RETURNING id
    """
)
_EVENT_SEEN = text("SELECT 1 FROM provider_events WHERE id = :id")
_PAYMENT_BY_REFERENCE = text("SELECT id, status FROM payments WHERE provider_reference = :ref")
_SUCCESS_EVENT = "payment_intent.succeeded"


class ProviderEvents:
    def __init__(
        self, engine: AsyncEngine, settlement: Settlement, provider: GuardedProvider
    ) -> None:
        self._engine = engine
        self._reads = autocommit_reads(engine)
        self._settlement = settlement
        self._provider = provider

    async def handle_event(self, event: ProviderEvent) -> bool:
        """Applies a verified webhook event once; False when it was seen before (or names a
        charge the provider does not know). A provider that cannot be reached fails the
        delivery (ProviderUnavailable), so the provider delivers it again later."""
        async with self._reads.connect() as conn:
            if (await conn.execute(_EVENT_SEEN, {"id": event.id})).first() is not None:
                return False
            payment = None
            if event.intent_reference is not None:
                payment = (
                    await conn.execute(_PAYMENT_BY_REFERENCE, {"ref": event.intent_reference})
                ).first()
        intent = None
        if (
            payment is not None
            and event.intent_reference is not None
            and _may_change(PaymentStatus(payment.status), event)
        ):
            try:
                intent = await self._provider.retrieve_intent(event.intent_reference)
            except PaymentUnknownToProvider:
                _log.warning(
                    "webhook names a charge the provider does not know",
                    event_id=event.id,
                    payment_id=str(payment.id),
                )
                return False
        return await in_transaction(
            self._engine,
            lambda conn: self._apply(conn, event, payment.id if payment else None, intent),
        )

    async def _apply(
        self,
        conn: AsyncConnection,
        event: ProviderEvent,
        payment_id: uuid.UUID | None,
        intent: ProviderIntent | None,
    ) -> bool:
        fresh = (await conn.execute(_RECORD_EVENT, {"id": event.id, "type": event.type})).first()
        if fresh is None:
            return False
        if payment_id is not None and intent is not None:
            await self._settlement.settle_in(conn, payment_id, intent)
        return True


def _may_change(status: PaymentStatus, event: ProviderEvent) -> bool:
    """Whether the charge an event names could change a payment in `status` (only what
    the provider says then decides how)."""
    return status is PaymentStatus.PENDING or (
        status is PaymentStatus.FAILED and event.type == _SUCCESS_EVENT
    )
