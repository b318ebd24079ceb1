"""Charging an order: recording the payment, then creating and confirming the provider's
intent (see the package's docstring for why in that order)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import structlog
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.engine import autocommit_reads
from server.db.transactions import UNIQUE_VIOLATION, in_transaction, sqlstate
from server.domain.errors import NotFound, check_replay
from server.domain.identity import Principal
from server.domain.money import Money
from server.domain.orders import OrderStatus, check_payable
from server.domain.payments import (
    IntentStatus,
    Payment,
    PaymentRequest,
    PaymentStatus,
    payment_in_progress,
    to_minor_units,
)
from server.services.circuit import GuardedProvider
from server.services.orders.records import LOCK_ORDER
from server.services.payments.records import (
    GET_PAYMENT,
    PAYMENT_COLUMNS,
    load_payment,
    payment_from_row,
)
from server.services.payments.settlement import Settlement
from server.services.providers import (
    CardDeclined,
    ProviderError,
    ProviderOutcomeUnknown,
    ProviderRejected,
)

_log = structlog.get_logger("marketplace.payments")

_FIND_PAYMENT_REQUEST = text(
    f"""
    SELECT {PAYMENT_COLUMNS}, request_fingerprint, payment_method FROM payments
     WHERE customer_id = :customer_id AND request_id = :request_id
    """
)
_PENDING_PAYMENT_OF_ORDER = text(
    "SELECT id FROM payments WHERE order_id = :order_id AND status = 'PENDING'"
)
_INSERT_PAYMENT = text(
    f"""
    INSERT INTO payments (id, order_id, customer_id, request_id, request_fingerprint, status,
                          currency, amount, provider, payment_method, next_check_time)
    VALUES (:id, :order_id, :customer_id, :request_id, :fingerprint, 'PENDING', :currency,
            :amount, :provider, :payment_method,
            now() + make_interval(secs => CAST(:lease AS double precision)))
    RETURNING {PAYMENT_COLUMNS}, payment_method
    """
)
_RECORD_REFERENCE = text(
    """
    UPDATE payments
       SET provider_reference = :reference, update_time = now(),
           next_check_time = now() + make_interval(secs => CAST(:lease AS double precision))
     WHERE id = :id AND status = 'PENDING' AND provider_reference IS NULL
    RETURNING id
    """
)


class Charging:
    def __init__(
        self,
        engine: AsyncEngine,
        provider: GuardedProvider,
        settlement: Settlement,
        *,
        lease_seconds: float,
        on_answered: Callable[[PaymentStatus], None] = lambda status: None,
    ) -> None:
        """`lease_seconds`: how long a charge in flight keeps the reconciler away; it must
        outlast a provider call with all its retries. `on_answered(status)` hears the
        status every create_payment answers with, for the business metrics."""
        self._engine = engine
        self._reads = autocommit_reads(engine)
        self._provider = provider
        self._settlement = settlement
        self._lease_seconds = lease_seconds
        self._on_answered = on_answered

    async def create_payment(self, principal: Principal, request: PaymentRequest) -> Payment:
        """Charges the customer's pending order with their payment method, once per
        request_id: a retry answers with the first attempt's outcome, or resumes it."""
        # While the circuit is open nothing is written and the provider is not called.
        await self._provider.raise_if_open()
        payment, payment_method = await self._record_payment(principal, request)
        if payment.status is PaymentStatus.PENDING:
            payment = await self.charge_at_provider(payment, payment_method)
        self._on_answered(payment.status)
        return payment

    async def _record_payment(
        self, principal: Principal, request: PaymentRequest
    ) -> tuple[Payment, str]:
        try:
            return await in_transaction(
                self._engine, lambda conn: self._record_payment_in(conn, principal, request)
            )
        except IntegrityError as error:
            if sqlstate(error) != UNIQUE_VIOLATION:
                raise
            # A concurrent call won the race for this request_id or for this order; its
            # row is committed now, so a second look answers as if it came first.
            async with self._engine.begin() as conn:
                return await self._record_payment_in(conn, principal, request)

    async def _record_payment_in(
        self, conn: AsyncConnection, principal: Principal, request: PaymentRequest
    ) -> tuple[Payment, str]:
        order_id = uuid.UUID(request.order_id)
        order = (await conn.execute(LOCK_ORDER, {"id": order_id})).first()
        # Only the order's customer pays it; anyone else is told it does not exist.
        if order is None or order.customer_id != principal.subject:
            raise NotFound("order", request.order_id)
        earlier = (
            await conn.execute(
                _FIND_PAYMENT_REQUEST,
                {"customer_id": principal.subject, "request_id": request.request_id},
            )
        ).first()
        if earlier is not None:
            check_replay(request.request_id, earlier.request_fingerprint, request.fingerprint())
            return payment_from_row(earlier), earlier.payment_method
        check_payable(request.order_id, OrderStatus(order.status), order.expire_time, order.db_now)
        pending = (await conn.execute(_PENDING_PAYMENT_OF_ORDER, {"order_id": order_id})).first()
        if pending is not None:
            raise payment_in_progress(request.order_id, str(pending.id))
        total = Money(order.currency, order.total)
        to_minor_units(total)  # refuses an amount the provider cannot charge, before any work
        row = (
            await conn.execute(
                _INSERT_PAYMENT,
                {
                    "id": uuid.uuid4(),
                    "order_id": order_id,
                    "customer_id": principal.subject,
                    "request_id": request.request_id,
                    "fingerprint": request.fingerprint(),
                    "currency": total.currency,
                    "amount": total.amount,
                    "provider": self._provider.name,
                    "payment_method": request.payment_method,
                    "lease": self._lease_seconds,
                },
            )
        ).one()
        return payment_from_row(row), row.payment_method

    async def charge_at_provider(self, payment: Payment, payment_method: str) -> Payment:
        """Runs the provider steps a PENDING payment still needs, from wherever it is:
        create the intent and record its id, then confirm it, then settle."""
        reference = payment.provider_reference
        try:
            if not reference:
                intent = await self._provider.create_intent(
                    amount_minor=to_minor_units(payment.amount),
                    currency=payment.amount.currency,
                    payment_method=payment_method,
                    metadata={"order_id": payment.order_id, "payment_id": payment.id},
                    idempotency_key=f"{payment.id}:create",
                )
                recorded = await self._record_reference(payment.id, intent.reference)
                if recorded is None:
                    # The reconciler settled it meanwhile (the lease ran out): never
                    # confirm a payment that is no longer pending.
                    return await load_payment(self._reads, uuid.UUID(payment.id))
                reference = recorded
            intent = await self._provider.confirm_intent(
                reference, idempotency_key=f"{payment.id}:confirm"
            )
        except CardDeclined as declined:
            return await self._settlement.settle_failure(
                payment.id, declined.code, declined.message
            )
        except ProviderRejected as rejected:
            if reference:
                # The confirm was refused, but the intent may have been charged by another
                # attempt: only the intent's own state may fail the payment.
                return await self._settle_rejected_confirm(payment.id, reference, rejected)
            return await self._settlement.settle_failure(
                payment.id, rejected.code, rejected.message
            )
        except ProviderOutcomeUnknown:
            # The charge may or may not have happened: only the provider can say, and the
            # reconciler (or a webhook) will ask. The payment stays PENDING meanwhile.
            _log.warning("payment outcome unknown", payment_id=payment.id)
            return await load_payment(self._reads, uuid.UUID(payment.id))
        return await self._settlement.settle_payment(uuid.UUID(payment.id), intent)

    async def _settle_rejected_confirm(
        self, payment_id: str, reference: str, rejected: ProviderRejected
    ) -> Payment:
        try:
            intent = await self._provider.retrieve_intent(reference)
        except ProviderError:
            _log.warning("confirm refused and intent unknown", payment_id=payment_id)
            # PENDING: the reconciler asks
            return await load_payment(self._reads, uuid.UUID(payment_id))
        if intent.status in (IntentStatus.SUCCEEDED, IntentStatus.PROCESSING):
            return await self._settlement.settle_payment(uuid.UUID(payment_id), intent)
        return await self._settlement.settle_failure(payment_id, rejected.code, rejected.message)

    async def _record_reference(self, payment_id: str, reference: str) -> str | None:
        """Records the intent's id, or answers with the one a concurrent retry recorded
        first (so only one intent is ever confirmed); None when no longer pending."""
        async with self._engine.begin() as conn:
            recorded = (
                await conn.execute(
                    _RECORD_REFERENCE,
                    {
                        "id": uuid.UUID(payment_id),
                        "reference": reference,
                        "lease": self._lease_seconds,
                    },
                )
            ).first()
            if recorded is not None:
                return reference
            row = (await conn.execute(GET_PAYMENT, {"id": uuid.UUID(payment_id)})).one()
            if row.status != PaymentStatus.PENDING:
                return None
            winner: str = row.provider_reference
            return winner
