"""Provider events (webhooks): each applied once, in the transaction that records it."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.transactions import in_transaction
from server.services.payments.settlement import Settlement
from server.services.providers import ProviderEvent

_RECORD_EVENT = text(
    """
    INSERT INTO provider_events (id, type) VALUES (:id, :type)
    ON CONFLICT (id) DO NOTHING RETURNING id
    """
)
_PAYMENT_BY_REFERENCE = text("SELECT id, order_id FROM payments WHERE provider_reference = :ref")


class ProviderEvents:
    def __init__(self, engine: AsyncEngine, settlement: Settlement) -> None:
        self._engine = engine
        self._settlement = settlement

    async def handle_event(self, event: ProviderEvent) -> bool:
        """Applies a verified webhook event once; False when it was seen before."""
        return await in_transaction(self._engine, lambda conn: self._apply(conn, event))

    async def _apply(self, conn: AsyncConnection, event: ProviderEvent) -> bool:
        fresh = (await conn.execute(_RECORD_EVENT, {"id": event.id, "type": event.type})).first()
        if fresh is None:
            return False
        if event.intent is None:
            return True
        payment = (
            await conn.execute(_PAYMENT_BY_REFERENCE, {"ref": event.intent.reference})
        ).first()
        if payment is not None:
            await self._settlement.settle_in(conn, payment.id, event.intent)
        return True
