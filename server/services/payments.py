"""Payment use cases: charging an order, refunds, cancelling a paid order, provider events.

A charge is two durable steps. First the payment is recorded PENDING and a provider intent
is created unconfirmed (it can charge nothing); its id is recorded. Only then is it
confirmed, by that recorded id. So a retry, a crash or a concurrent call can at worst
confirm the one recorded intent again, which the provider refuses: an order is never
charged twice, whatever the provider does with idempotency keys.

Every database step is its own short transaction (no transaction is held open across a
provider call). A step that cannot finish leaves its row PENDING with a lease
(`next_check_time`); the reconciler (server/services/upkeep.py) finishes what is left once
the lease runs out, so a crash between steps resumes after restart.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.transactions import UNIQUE_VIOLATION, retrying_transaction, sqlstate
from server.domain.errors import FailedPrecondition, NotFound, RequestIdReused
from server.domain.identity import Principal
from server.domain.money import Money
from server.domain.orders import (
    Order,
    OrderEvent,
    OrderStatus,
    check_payable,
    next_status,
    releases_stock,
)
from server.domain.pagination import decode_page_token, encode_page_token, invalid_page_token
from server.domain.payments import (
    Payment,
    PaymentRequest,
    PaymentStatus,
    RefundRequest,
    RefundStatus,
    fingerprint_of,
    from_minor_units,
    payment_in_progress,
    refund_amount,
    refund_in_progress,
    status_after_refund,
    to_minor_units,
)
from server.services.circuit import GuardedProvider
from server.services.orders import Orders, RefundNeeded, release_stock
from server.services.product_cache import ProductsChanged, no_cache
from server.services.providers import (
    CardDeclined,
    IntentStatus,
    ProviderError,
    ProviderEvent,
    ProviderIntent,
    ProviderOutcomeUnknown,
    ProviderRefund,
    ProviderRejected,
)

_log = structlog.get_logger("marketplace.payments")

PAYMENT_COLUMNS = (
    "id, order_id, customer_id, status, currency, amount, amount_refunded, provider,"
    " provider_reference, failure_code, failure_message, create_time, update_time"
)
_LOCK_ORDER = text(
    """
    SELECT id, customer_id, status, currency, total, expire_time, now() AS db_now
      FROM orders WHERE id = :id FOR UPDATE
    """
)
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
_GET_PAYMENT = text(f"SELECT {PAYMENT_COLUMNS}, payment_method FROM payments WHERE id = :id")
_LOCK_PAYMENT = text(f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = :id FOR UPDATE")
_PAYMENT_BY_REFERENCE = text("SELECT id, order_id FROM payments WHERE provider_reference = :ref")
_SETTLE_PAYMENT = text(
    """
    UPDATE payments SET status = :status, failure_code = :code, failure_message = :message,
                        next_check_time = NULL, update_time = now()
     WHERE id = :id
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
_RECHECK_REFUND_LATER = text(
    """
    UPDATE refunds
       SET update_time = now(),
           next_check_time = now() + make_interval(secs => CAST(:after AS double precision))
     WHERE id = :id AND status = 'PENDING'
    """
)
_SET_ORDER_STATUS = text("UPDATE orders SET status = :status, update_time = now() WHERE id = :id")
_CANCEL_ORDER = text(
    """
    UPDATE orders SET status = :status, cancel_request_id = :request_id, cancelled_by = :actor,
                      update_time = now()
     WHERE id = :id
    """
)
_LIST_PAYMENTS = text(
    f"""
    SELECT {PAYMENT_COLUMNS} FROM payments
     WHERE order_id = :order_id AND (create_time, id) < (:before_time, :before_id)
     ORDER BY create_time DESC, id DESC LIMIT :limit
    """
)
_ORDER_OWNER = text("SELECT customer_id FROM orders WHERE id = :id")

_FIND_REFUND_REQUEST = text(
    """
    SELECT id, payment_id, request_fingerprint, status FROM refunds
     WHERE actor = :actor AND request_id = :request_id
    """
)
_PENDING_REFUND_OF_PAYMENT = text(
    "SELECT id, cancels_order FROM refunds WHERE payment_id = :payment_id AND status = 'PENDING'"
)
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
_ADD_REFUNDED = text(
    """
    UPDATE payments SET amount_refunded = amount_refunded + :amount, status = :status,
                        update_time = now()
     WHERE id = :id
    """
)
_RECORD_EVENT = text(
    """
    INSERT INTO provider_events (id, type) VALUES (:id, :type)
    ON CONFLICT (id) DO NOTHING RETURNING id
    """
)
_FAR_FUTURE = datetime.fromisoformat("9999-12-31T00:00:00+00:00")
_MAX_UUID = uuid.UUID(int=(1 << 128) - 1)
# The refund that cancelling a paid order starts, when the caller gave no request_id.
_AUTOMATIC_CANCEL_KEY = "cancel:{order_id}"
# The refund of money taken for an order that can no longer be paid (see _settle_in).
_AUTOMATIC_REFUND_ACTOR = "system"


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


class Payments:
    def __init__(
        self,
        engine: AsyncEngine,
        orders: Orders,
        provider: GuardedProvider,
        *,
        lease_seconds: float,
        recheck_seconds: float,
        products_changed: ProductsChanged = no_cache,
    ) -> None:
        """`lease_seconds`: how long work in flight keeps the reconciler away from a row; it
        must outlast a provider call with all its retries. `recheck_seconds`: when to look
        again at a payment the provider is still processing."""
        self._engine = engine
        self._orders = orders
        self._provider = provider
        self._lease_seconds = lease_seconds
        self._recheck_seconds = recheck_seconds
        self._products_changed = products_changed
        self._reads = engine.execution_options(isolation_level="AUTOCOMMIT")

    # --- charging -------------------------------------------------------------------

    async def create_payment(self, principal: Principal, request: PaymentRequest) -> Payment:
        # While the circuit is open nothing is written and the provider is not called.
        await self._provider.raise_if_open()
        payment, payment_method = await self._begin_payment(principal, request)
        if payment.status is not PaymentStatus.PENDING:
            return payment  # a retry of a request that already has its outcome
        return await self._drive(payment, payment_method)

    async def _begin_payment(
        self, principal: Principal, request: PaymentRequest
    ) -> tuple[Payment, str]:
        try:
            async for attempt in retrying_transaction():
                with attempt:
                    async with self._engine.begin() as conn:
                        return await self._record_payment(conn, principal, request)
        except IntegrityError as error:
            if sqlstate(error) != UNIQUE_VIOLATION:
                raise
            # A concurrent call won the race for this request_id or for this order; its
            # row is committed now, so a second look answers as if it came first.
            async with self._engine.begin() as conn:
                return await self._record_payment(conn, principal, request)
        raise AssertionError("unreachable: retrying_transaction re-raises")

    async def _record_payment(
        self, conn: AsyncConnection, principal: Principal, request: PaymentRequest
    ) -> tuple[Payment, str]:
        order_id = uuid.UUID(request.order_id)
        order = (await conn.execute(_LOCK_ORDER, {"id": order_id})).first()
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
            if earlier.request_fingerprint != request.fingerprint():
                raise RequestIdReused(request.request_id)
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

    async def _drive(self, payment: Payment, payment_method: str) -> Payment:
        """Runs the provider steps a PENDING payment still needs, from wherever it is."""
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
                    return await self._load(uuid.UUID(payment.id))
                reference = recorded
            intent = await self._provider.confirm_intent(
                reference, idempotency_key=f"{payment.id}:confirm"
            )
        except CardDeclined as declined:
            return await self._settle_failure(payment.id, declined.code, declined.message)
        except ProviderRejected as rejected:
            if reference:
                # The confirm was refused, but the intent may have been charged by another
                # attempt: only the intent's own state may fail the payment.
                return await self._settle_rejected_confirm(payment.id, reference, rejected)
            return await self._settle_failure(payment.id, rejected.code, rejected.message)
        except ProviderOutcomeUnknown:
            # The charge may or may not have happened: only the provider can say, and the
            # reconciler (or a webhook) will ask. The payment stays PENDING meanwhile.
            _log.warning("payment outcome unknown", payment_id=payment.id)
            return await self._load(uuid.UUID(payment.id))
        return await self.settle_payment(uuid.UUID(payment.id), intent)

    async def _settle_rejected_confirm(
        self, payment_id: str, reference: str, rejected: ProviderRejected
    ) -> Payment:
        try:
            intent = await self._provider.retrieve_intent(reference)
        except ProviderError:
            _log.warning("confirm refused and intent unknown", payment_id=payment_id)
            return await self._load(uuid.UUID(payment_id))  # PENDING: the reconciler asks
        if intent.status in (IntentStatus.SUCCEEDED, IntentStatus.PROCESSING):
            return await self.settle_payment(uuid.UUID(payment_id), intent)
        return await self._settle_failure(payment_id, rejected.code, rejected.message)

    async def _record_reference(self, payment_id: str, reference: str) -> str | None:
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
            # A concurrent retry of the same request recorded its intent first: use that
            # one, so only one intent is ever confirmed.
            row = (await conn.execute(_GET_PAYMENT, {"id": uuid.UUID(payment_id)})).one()
            if row.status != PaymentStatus.PENDING:
                return None
            winner: str = row.provider_reference
            return winner

    async def _settle_failure(self, payment_id: str, code: str, message: str) -> Payment:
        failed = ProviderIntent(
            reference="",
            status=IntentStatus.FAILED,
            amount_minor=0,
            currency="",
            failure_code=code,
            failure_message=message,
        )
        return await self.settle_payment(uuid.UUID(payment_id), failed)

    async def settle_payment(self, payment_id: uuid.UUID, intent: ProviderIntent) -> Payment:
        """Applies the provider's word on a payment (from a call, webhook or reconciler)."""
        async for attempt in retrying_transaction():
            with attempt:
                async with self._engine.begin() as conn:
                    await self._settle_in(conn, payment_id, intent)
        return await self._load(payment_id)

    async def _settle_in(
        self, conn: AsyncConnection, payment_id: uuid.UUID, intent: ProviderIntent
    ) -> None:
        # Lock order first, then payment: the order every payment transaction uses.
        current = (await conn.execute(_GET_PAYMENT, {"id": payment_id})).one()
        order = (await conn.execute(_LOCK_ORDER, {"id": current.order_id})).one()
        payment = payment_from_row((await conn.execute(_LOCK_PAYMENT, {"id": payment_id})).one())
        if payment.status is PaymentStatus.FAILED and intent.status is IntentStatus.SUCCEEDED:
            if not await self._revive_failed_payment(conn, payment, current.order_id):
                return
        elif payment.status is not PaymentStatus.PENDING:
            return  # settled already (by the call, a webhook or the reconciler): once only
        if intent.status is IntentStatus.FAILED:
            await conn.execute(
                _SETTLE_PAYMENT,
                {
                    "id": payment_id,
                    "status": PaymentStatus.FAILED.value,
                    "code": intent.failure_code or "payment_failed",
                    "message": intent.failure_message or "the provider declined the payment",
                },
            )
            return
        if intent.status is not IntentStatus.SUCCEEDED:
            await conn.execute(
                _RECHECK_PAYMENT_LATER, {"id": payment_id, "after": self._recheck_seconds}
            )
            return
        charged = from_minor_units(intent.currency, intent.amount_minor)
        if charged != payment.amount:
            # Never mark an order paid on a charge that does not match it; an operator
            # must look. The payment stays PENDING and keeps being reported.
            _log.error(
                "provider charge does not match the payment",
                payment_id=str(payment_id),
                charged=f"{charged.amount} {charged.currency}",
                expected=f"{payment.amount.amount} {payment.amount.currency}",
            )
            await conn.execute(
                _RECHECK_PAYMENT_LATER, {"id": payment_id, "after": self._recheck_seconds}
            )
            return
        await conn.execute(
            _SETTLE_PAYMENT,
            {"id": payment_id, "status": PaymentStatus.SUCCEEDED.value, "code": "", "message": ""},
        )
        status = OrderStatus(order.status)
        if status is OrderStatus.PENDING_PAYMENT:
            target = next_status(str(order.id), status, OrderEvent.PAYMENT_SUCCEEDED)
            await conn.execute(_SET_ORDER_STATUS, {"id": order.id, "status": target.value})
            return
        # Money arrived for an order that can no longer take it (it cannot happen through
        # our own paths, which refuse to expire or cancel an order with a payment in
        # flight): give it back rather than keep it.
        _log.error("payment succeeded for an order that is not payable", order_id=str(order.id))
        await self._insert_refund(
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

    async def _revive_failed_payment(
        self, conn: AsyncConnection, payment: Payment, order_id: uuid.UUID
    ) -> bool:
        """The provider charged a payment we recorded as failed (a confirm we took for
        refused went through after all). The money is real: unless another payment of the
        order is live, the payment goes back to PENDING so it settles as a success (paying
        the order, or refunding itself if the order can no longer be paid)."""
        other = (
            await conn.execute(_OTHER_LIVE_PAYMENT, {"order_id": order_id, "id": payment.id})
        ).first()
        if other is not None:
            _log.error(
                "order charged twice: a payment recorded as failed was charged while another"
                " is live; refund it at the provider",
                payment_id=payment.id,
                live_payment_id=str(other.id),
                order_id=str(order_id),
            )
            return False
        _log.warning("a failed payment was charged after all", payment_id=payment.id)
        await conn.execute(_REOPEN_PAYMENT, {"id": uuid.UUID(payment.id)})
        return True

    # --- reading --------------------------------------------------------------------

    async def _load(self, payment_id: uuid.UUID) -> Payment:
        async with self._reads.connect() as conn:
            return payment_from_row((await conn.execute(_GET_PAYMENT, {"id": payment_id})).one())

    async def get_payment(self, principal: Principal, payment_id: str) -> Payment:
        async with self._reads.connect() as conn:
            row = (await conn.execute(_GET_PAYMENT, {"id": uuid.UUID(payment_id)})).first()
        if row is None or not principal.may_see_customer(row.customer_id):
            raise NotFound("payment", payment_id)
        return payment_from_row(row)

    async def list_payments(
        self, principal: Principal, order_id: str, page_size: int, page_token: str
    ) -> tuple[list[Payment], str]:
        position = decode_page_token(page_token, kind="payments", scope=order_id)
        params: dict[str, Any] = {
            "order_id": uuid.UUID(order_id),
            "limit": page_size + 1,
            "before_time": _FAR_FUTURE,
            "before_id": _MAX_UUID,
        }
        if position is not None:
            try:
                params["before_time"] = datetime.fromisoformat(str(position["t"]))
                params["before_id"] = uuid.UUID(str(position["id"]))
            except (KeyError, ValueError):
                raise invalid_page_token() from None
        async with self._reads.connect() as conn:
            owner = (await conn.execute(_ORDER_OWNER, {"id": params["order_id"]})).first()
            if owner is None or not principal.may_see_customer(owner.customer_id):
                raise NotFound("order", order_id)
            rows = (await conn.execute(_LIST_PAYMENTS, params)).all()
        page = rows[:page_size]
        next_token = ""
        if len(rows) > page_size:
            last = page[-1]
            next_token = encode_page_token(
                "payments", order_id, {"t": last.create_time.isoformat(), "id": str(last.id)}
            )
        return [payment_from_row(row) for row in page], next_token

    # --- refunds and cancellation -----------------------------------------------------

    async def refund_payment(self, principal: Principal, request: RefundRequest) -> Payment:
        await self._provider.raise_if_open()
        refund_id = await self._in_transaction(
            lambda conn: self._record_refund(conn, principal, request),
            request_id=request.request_id,
        )
        if refund_id is not None:
            await self.run_refund(refund_id)
        return await self._load(uuid.UUID(request.payment_id))

    async def _record_refund(
        self, conn: AsyncConnection, principal: Principal, request: RefundRequest
    ) -> uuid.UUID | None:
        """Records a PENDING refund and returns its id; None when there is nothing to run
        (a retry of a refund that already has its outcome)."""
        earlier = (
            await conn.execute(
                _FIND_REFUND_REQUEST,
                {"actor": principal.subject, "request_id": request.request_id},
            )
        ).first()
        if earlier is not None:
            if earlier.request_fingerprint != request.fingerprint():
                raise RequestIdReused(request.request_id)
            return earlier.id if earlier.status == RefundStatus.PENDING else None
        payment_id = uuid.UUID(request.payment_id)
        current = (await conn.execute(_GET_PAYMENT, {"id": payment_id})).first()
        if current is None:
            raise NotFound("payment", request.payment_id)
        await conn.execute(_LOCK_ORDER, {"id": current.order_id})
        payment = payment_from_row((await conn.execute(_LOCK_PAYMENT, {"id": payment_id})).one())
        amount = refund_amount(payment, request.amount)
        to_minor_units(amount)
        pending = (
            await conn.execute(_PENDING_REFUND_OF_PAYMENT, {"payment_id": payment_id})
        ).first()
        if pending is not None:
            raise refund_in_progress(payment.id)
        return await self._insert_refund(
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

    async def _insert_refund(
        self,
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

    async def _in_transaction(
        self,
        work: Callable[[AsyncConnection], Awaitable[uuid.UUID | None]],
        *,
        request_id: str,
    ) -> uuid.UUID | None:
        """Runs `work(conn)` in a retried transaction; a unique violation on the refund's
        request id means the caller reused it (or raced itself): decided by the index."""
        try:
            async for attempt in retrying_transaction():
                with attempt:
                    async with self._engine.begin() as conn:
                        result: uuid.UUID | None = await work(conn)
                        return result
        except IntegrityError as error:
            if sqlstate(error) == UNIQUE_VIOLATION:
                constraint = getattr(getattr(error.orig, "diag", None), "constraint_name", "")
                if constraint == "refunds_one_pending_per_payment":
                    raise FailedPrecondition(
                        "a refund of this payment is in progress; wait for its outcome",
                        reason="REFUND_IN_PROGRESS",
                    ) from None
                raise RequestIdReused(request_id) from None
            raise
        raise AssertionError("unreachable: retrying_transaction re-raises")

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
                reason="REFUND_REJECTED",
                metadata={"paymentId": str(row.payment_id), "providerCode": rejected.code},
            ) from None
        except ProviderOutcomeUnknown:
            _log.warning("refund outcome unknown", refund_id=str(refund_id))
            return
        await self.complete_refund(refund_id, refunded)

    async def complete_refund(self, refund_id: uuid.UUID, refunded: ProviderRefund) -> None:
        """Applies a refund the provider made: the payment's refunded amount and status and,
        when it empties a paid order's payment, the order's status and its stock, all in one
        transaction and exactly once."""
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
        async for attempt in retrying_transaction():
            with attempt:
                async with self._engine.begin() as conn:
                    released = await self._complete_refund_in(conn, refund_id, refunded)
                self._products_changed(released)

    async def _complete_refund_in(
        self, conn: AsyncConnection, refund_id: uuid.UUID, refunded: ProviderRefund
    ) -> list[str]:
        """Returns the products whose stock came back."""
        plan = (await conn.execute(_REFUND_TO_RUN, {"id": refund_id})).one()
        order = (await conn.execute(_LOCK_ORDER, {"id": plan.order_id})).one()
        payment = payment_from_row(
            (await conn.execute(_LOCK_PAYMENT, {"id": plan.payment_id})).one()
        )
        refund = (await conn.execute(_LOCK_REFUND, {"id": refund_id})).one()
        if refund.status != RefundStatus.PENDING:
            return []
        amount = Money(refund.currency, refund.amount)
        await conn.execute(_COMPLETE_REFUND, {"id": refund_id, "reference": refunded.reference})
        payment_status = status_after_refund(payment, amount)
        await conn.execute(
            _ADD_REFUNDED,
            {"id": plan.payment_id, "amount": amount.amount, "status": payment_status.value},
        )
        current = OrderStatus(order.status)
        if payment_status is not PaymentStatus.REFUNDED or current is not OrderStatus.PAID:
            return []
        event = OrderEvent.CANCELLED if refund.cancels_order else OrderEvent.REFUNDED_IN_FULL
        target = next_status(str(order.id), current, event)
        released = await release_stock(conn, [order.id]) if releases_stock(current, target) else []
        if refund.cancels_order:
            automatic = refund.request_id == _AUTOMATIC_CANCEL_KEY.format(order_id=order.id)
            await conn.execute(
                _CANCEL_ORDER,
                {
                    "id": order.id,
                    "status": target.value,
                    "request_id": None if automatic else refund.request_id,
                    "actor": refund.actor,
                },
            )
        else:
            await conn.execute(_SET_ORDER_STATUS, {"id": order.id, "status": target.value})
        return released

    async def cancel_order(self, principal: Principal, order_id: str, request_id: str) -> Order:
        """Cancels an order: a pending one at once; a paid one by refunding its payment
        first (a saga: the refund is recorded, sent, then applied together with the
        cancellation and the stock release; the reconciler resumes it after a crash)."""
        try:
            return await self._orders.cancel_order(principal, order_id, request_id)
        except RefundNeeded:
            pass
        await self._provider.raise_if_open()
        refund_id = await self._in_transaction(
            lambda conn: self._record_cancellation(conn, principal, order_id, request_id),
            request_id=request_id or _AUTOMATIC_CANCEL_KEY.format(order_id=order_id),
        )
        if refund_id is not None:
            await self.run_refund(refund_id)
        return await self._orders.get_order(principal, order_id)

    async def _record_cancellation(
        self, conn: AsyncConnection, principal: Principal, order_id: str, request_id: str
    ) -> uuid.UUID | None:
        order = (await conn.execute(_LOCK_ORDER, {"id": uuid.UUID(order_id)})).one()
        if OrderStatus(order.status) is not OrderStatus.PAID:
            return None  # cancelled meanwhile (a concurrent retry finished first)
        key = request_id or _AUTOMATIC_CANCEL_KEY.format(order_id=order_id)
        fingerprint = fingerprint_of(f"cancel;{order_id}")
        earlier = (
            await conn.execute(
                _FIND_REFUND_REQUEST, {"actor": principal.subject, "request_id": key}
            )
        ).first()
        if earlier is not None:
            if earlier.request_fingerprint != fingerprint:
                raise RequestIdReused(key)
            if earlier.status == RefundStatus.FAILED:
                # The order is still PAID: answering OK would claim a cancellation that did
                # not happen. The provider refused the refund; an operator must look.
                raise FailedPrecondition(
                    "the payment provider refused this cancellation's refund",
                    reason="REFUND_REJECTED",
                    metadata={"orderId": order_id, "refundId": str(earlier.id)},
                )
            return earlier.id if earlier.status == RefundStatus.PENDING else None
        payment = await self._paid_payment_of(conn, order.id)
        pending = (
            await conn.execute(_PENDING_REFUND_OF_PAYMENT, {"payment_id": uuid.UUID(payment.id)})
        ).first()
        if pending is not None:
            if pending.cancels_order:
                return uuid.UUID(str(pending.id))  # another caller's cancellation: finish it
            raise refund_in_progress(payment.id)
        return await self._insert_refund(
            conn,
            payment=payment,
            actor=principal.subject,
            request_id=key,
            fingerprint=fingerprint,
            amount=payment.refundable,
            reason="order cancelled",
            cancels_order=True,
            lease=self._lease_seconds,
        )

    async def _paid_payment_of(self, conn: AsyncConnection, order_id: uuid.UUID) -> Payment:
        row = (
            await conn.execute(
                text(
                    f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE order_id = :order_id"
                    " AND status IN ('SUCCEEDED', 'PARTIALLY_REFUNDED') FOR UPDATE"
                ),
                {"order_id": order_id},
            )
        ).first()
        if row is None:
            raise FailedPrecondition(
                f"order {order_id} is paid but has no refundable payment",
                reason="PAYMENT_NOT_REFUNDABLE",
                metadata={"orderId": str(order_id)},
            )
        return payment_from_row(row)

    # --- provider events -------------------------------------------------------------

    async def handle_event(self, event: ProviderEvent) -> bool:
        """Applies a verified webhook event once; False when it was seen before."""
        async for attempt in retrying_transaction():
            with attempt:
                async with self._engine.begin() as conn:
                    fresh = (
                        await conn.execute(_RECORD_EVENT, {"id": event.id, "type": event.type})
                    ).first()
                    if fresh is None:
                        return False
                    if event.intent is None:
                        return True
                    payment = (
                        await conn.execute(_PAYMENT_BY_REFERENCE, {"ref": event.intent.reference})
                    ).first()
                    if payment is not None:
                        await self._settle_in(conn, payment.id, event.intent)
                    return True
        raise AssertionError("unreachable: retrying_transaction re-raises")
