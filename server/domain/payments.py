"""Payments: what a valid payment or refund request is, and how a payment's status moves."""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from server.domain.errors import ErrorReason, FailedPrecondition, FieldViolation, InvalidArgument
from server.domain.money import Money, is_whole_at, is_whole_minor_units, minor_unit_exponent
from server.domain.orders import OrderEvent, OrderStatus, next_status, releases_stock
from server.domain.validation import (
    Violations,
    check_request_id,
    check_resource_id,
    check_text,
)

# A provider payment method id as the client-side SDK creates it (Stripe: pm_...). The
# card itself never reaches this server.
PAYMENT_METHOD_PATTERN = re.compile(r"pm_[A-Za-z0-9_]{1,250}")
MAX_REASON_LENGTH = 500

# Stripe counts two currencies otherwise than ISO 4217's minor unit (its currencies page,
# "special cases"): the króna in hundredths (ISO: none) and the ariary in whole units (ISO: 2).
_PROVIDER_EXPONENTS = {"ISK": 2, "MGA": 0}


class PaymentStatus(enum.StrEnum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REFUNDED = "REFUNDED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"


class IntentStatus(enum.StrEnum):
    """A provider charge's state, reduced to what decides a payment's fate."""

    # Created, not confirmed: nothing was charged and nothing will be without a confirm.
    REQUIRES_CONFIRMATION = "REQUIRES_CONFIRMATION"
    # The provider is still working on it (async methods, 3-D Secure, ...).
    PROCESSING = "PROCESSING"
    SUCCEEDED = "SUCCEEDED"
    # Declined, cancelled or abandoned: nothing was charged.
    FAILED = "FAILED"


class RefundStatus(enum.StrEnum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class Payment:
    id: str
    order_id: str
    customer_id: str
    status: PaymentStatus
    amount: Money
    amount_refunded: Money
    provider: str
    provider_reference: str
    failure_code: str
    failure_message: str
    create_time: datetime
    update_time: datetime

    @property
    def refundable(self) -> Money:
        return Money(self.amount.currency, self.amount.amount - self.amount_refunded.amount)


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    order_id: str
    request_id: str
    payment_method: str

    def fingerprint(self) -> str:
        """What a retry under the same request_id must repeat exactly."""
        return fingerprint_of(f"pay;{self.order_id};{self.payment_method}")


@dataclass(frozen=True, slots=True)
class RefundRequest:
    payment_id: str
    request_id: str
    amount: Money | None  # None: everything not yet refunded
    reason: str
    # Record the refund without the provider, which has no record of the payment: the
    # money went back by other means, or none was ever held (an admin's way out).
    outside_provider: bool = False

    def fingerprint(self) -> str:
        amount = "rest" if self.amount is None else f"{self.amount.currency}{self.amount.amount}"
        outside = ";outside-provider" if self.outside_provider else ""
        return fingerprint_of(f"refund;{self.payment_id};{amount};{self.reason}{outside}")


def fingerprint_of(canonical: str) -> str:
    """What a request under one request_id must repeat, as stored (64 hex characters)."""
    return hashlib.sha256(canonical.encode()).hexdigest()


def payment_request(order_id: str, request_id: str, payment_method: str) -> PaymentRequest:
    violations = Violations()
    canonical_order_id = check_resource_id(violations, "order_id", order_id)
    check_request_id(violations, "request_id", request_id, required=True)
    if not payment_method:
        violations.add("payment_method", "is required (a provider payment method id, pm_...)")
    elif not PAYMENT_METHOD_PATTERN.fullmatch(payment_method):
        violations.add(
            "payment_method",
            "must be a provider payment method id such as pm_1Nx..., created on the client;"
            " card numbers are never accepted here",
        )
    violations.raise_if_any()
    assert canonical_order_id is not None
    return PaymentRequest(canonical_order_id, request_id, payment_method)


def refund_request(
    payment_id: str,
    request_id: str,
    amount: Money | None,
    amount_problems: list[str],
    reason: str,
    *,
    outside_provider: bool = False,
) -> RefundRequest:
    """Validates a RefundPayment request; `amount_problems` are the Money field's own."""
    violations = Violations()
    canonical_id = check_resource_id(violations, "id", payment_id)
    check_request_id(violations, "request_id", request_id, required=True)
    for problem in amount_problems:
        violations.add("amount", problem)
    if amount is not None and not amount_problems:
        if amount.amount <= 0:
            violations.add("amount", "must be positive; omit it to refund everything left")
        elif not is_whole_minor_units(amount):
            violations.add("amount", f"must be a whole number of {amount.currency}'s smallest unit")
    if reason:
        check_text(violations, "reason", reason, min_len=0, max_len=MAX_REASON_LENGTH)
    violations.raise_if_any()
    assert canonical_id is not None
    return RefundRequest(canonical_id, request_id, amount, reason, outside_provider)


def provider_exponent(currency: str) -> int:
    """The decimals of the unit the payment provider counts amounts in (cents for USD)."""
    return _PROVIDER_EXPONENTS.get(currency, minor_unit_exponent(currency))


def chargeable_exponent(currency: str) -> int:
    """The decimals of the smallest amount that can be charged: ISO 4217's minor unit, or
    the provider's own when coarser (whole ariary)."""
    return min(minor_unit_exponent(currency), provider_exponent(currency))


def is_chargeable(money: Money) -> bool:
    return is_whole_at(money, chargeable_exponent(money.currency))


def to_minor_units(money: Money) -> int:
    """The amount as the card provider counts it (cents); refuses what it cannot charge."""
    if not is_chargeable(money):
        raise FailedPrecondition(
            f"{money.amount} {money.currency} is not a whole number of minor units",
            reason=ErrorReason.AMOUNT_NOT_CHARGEABLE,
            metadata={"currency": money.currency, "amount": str(money.amount)},
        )
    return int(money.amount.scaleb(provider_exponent(money.currency)))


def from_minor_units(currency: str, minor: int) -> Money:
    return Money(currency, Decimal(minor).scaleb(-provider_exponent(currency)))


def refund_amount(payment: Payment, requested: Money | None) -> Money:
    """How much a refund takes back: `requested`, or all that is left when omitted."""
    if payment.status not in (PaymentStatus.SUCCEEDED, PaymentStatus.PARTIALLY_REFUNDED):
        raise FailedPrecondition(
            f"payment {payment.id} is {payment.status.value}; only a succeeded payment"
            " can be refunded",
            reason=ErrorReason.PAYMENT_NOT_REFUNDABLE,
            metadata={"paymentId": payment.id, "status": payment.status.value},
        )
    left = payment.refundable
    if requested is None:
        return left
    if requested.currency != payment.amount.currency:
        raise InvalidArgument(
            [
                FieldViolation(
                    "amount.currency_code",
                    f"must be the payment's currency, {payment.amount.currency}",
                )
            ]
        )
    if requested.amount > left.amount:
        raise FailedPrecondition(
            f"cannot refund {requested.amount} {requested.currency}: only {left.amount}"
            " is left to refund",
            reason=ErrorReason.REFUND_EXCEEDS_PAYMENT,
            metadata={
                "paymentId": payment.id,
                "requested": str(requested.amount),
                "refundable": str(left.amount),
            },
        )
    return requested


def status_after_refund(payment: Payment, refunded: Money) -> PaymentStatus:
    """The payment's status once `refunded` more has been given back."""
    total = payment.amount_refunded.amount + refunded.amount
    return (
        PaymentStatus.REFUNDED
        if total >= payment.amount.amount
        else (PaymentStatus.PARTIALLY_REFUNDED)
    )


def payment_in_progress(order_id: str, payment_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"a payment of order {order_id} is in progress; wait for its outcome",
        reason=ErrorReason.PAYMENT_IN_PROGRESS,
        metadata={"orderId": order_id, "paymentId": payment_id},
    )


# A refund's failure_code when the provider had no record of the payment it refunds.
PAYMENT_UNKNOWN_FAILURE = "payment_unknown_to_provider"


def refund_refused(
    *,
    payment_id: str,
    refund_id: str,
    provider_reference: str,
    failure_code: str,
    failure_message: str,
) -> FailedPrecondition:
    """What a refund the provider refused answers, to its call and to every retry of it."""
    if failure_code == PAYMENT_UNKNOWN_FAILURE:
        return FailedPrecondition(
            f"the payment provider has no record of payment {payment_id} ({provider_reference});"
            " nothing was refunded. Once the money went back by other means, or none is held,"
            " an admin records the refund with RefundPayment and outside_provider set",
            reason=ErrorReason.PAYMENT_UNKNOWN_TO_PROVIDER,
            metadata={
                "paymentId": payment_id,
                "providerReference": provider_reference,
                "refundId": refund_id,
            },
        )
    return FailedPrecondition(
        f"the payment provider refused the refund: {failure_message}",
        reason=ErrorReason.REFUND_REJECTED,
        metadata={"paymentId": payment_id, "refundId": refund_id, "providerCode": failure_code},
    )


def payment_known_to_provider(payment_id: str, provider_reference: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the payment provider holds payment {payment_id} ({provider_reference}): refund it"
        " there, without outside_provider",
        reason=ErrorReason.PAYMENT_KNOWN_TO_PROVIDER,
        metadata={"paymentId": payment_id, "providerReference": provider_reference},
    )


def refund_in_progress(payment_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"a refund of payment {payment_id} is in progress; wait for its outcome",
        reason=ErrorReason.REFUND_IN_PROGRESS,
        metadata={"paymentId": payment_id},
    )


@dataclass(frozen=True, slots=True)
class ChargeOutcome:
    """What the provider says of a payment's charge."""

    status: IntentStatus
    charged: Money | None  # what was taken, when it SUCCEEDED
    failure_code: str = ""
    failure_message: str = ""


@dataclass(frozen=True, slots=True)
class SettlementPlan:
    """What applying the provider's word to a payment changes, in one transaction."""

    # The payment was recorded FAILED, yet the provider charged it: it goes back to
    # PENDING before it settles, so the money is accounted for.
    reopen: bool = False
    settle_as: PaymentStatus | None = None
    failure_code: str = ""
    failure_message: str = ""
    recheck_later: bool = False  # the provider has not decided yet: ask again later
    order_status: OrderStatus | None = None
    refund_in_full: bool = False  # money arrived for an order that can no longer take it
    alarm: str = ""  # something an operator must look at (logged as an error)


def revives(payment: Payment, outcome: ChargeOutcome) -> bool:
    """A payment recorded FAILED that the provider charged after all (a confirm we took for
    refused went through): the settlement needs to know whether another payment of the
    order is live."""
    return payment.status is PaymentStatus.FAILED and outcome.status is IntentStatus.SUCCEEDED


def settlement(
    payment: Payment,
    order_status: OrderStatus,
    outcome: ChargeOutcome,
    *,
    other_live_payment: bool = False,
) -> SettlementPlan:
    """Decides what the provider's word on a payment does, once: a payment already settled
    (by the call, a webhook or the reconciler) is left alone."""
    reopen = False
    if revives(payment, outcome):
        if other_live_payment:
            return SettlementPlan(
                alarm="order charged twice: a payment recorded as failed was charged while"
                " another is live; refund it at the provider"
            )
        reopen = True
    elif payment.status is not PaymentStatus.PENDING:
        return SettlementPlan()
    if outcome.status is IntentStatus.FAILED:
        return SettlementPlan(
            reopen=reopen,
            settle_as=PaymentStatus.FAILED,
            failure_code=outcome.failure_code or "payment_failed",
            failure_message=outcome.failure_message or "the provider declined the payment",
        )
    if outcome.status is not IntentStatus.SUCCEEDED:
        return SettlementPlan(reopen=reopen, recheck_later=True)
    if outcome.charged != payment.amount:
        # Never mark an order paid on a charge that does not match it: the payment stays
        # PENDING and keeps being reported.
        return SettlementPlan(
            reopen=reopen,
            recheck_later=True,
            alarm="provider charge does not match the payment",
        )
    if order_status is OrderStatus.PENDING_PAYMENT:
        return SettlementPlan(
            reopen=reopen,
            settle_as=PaymentStatus.SUCCEEDED,
            order_status=next_status(payment.order_id, order_status, OrderEvent.PAYMENT_SUCCEEDED),
        )
    # Money arrived for an order that can no longer take it (our own paths refuse to expire
    # or cancel an order with a payment in flight): give it back rather than keep it.
    return SettlementPlan(
        reopen=reopen,
        settle_as=PaymentStatus.SUCCEEDED,
        refund_in_full=True,
        alarm="payment succeeded for an order that is not payable",
    )


@dataclass(frozen=True, slots=True)
class RefundCompletion:
    """What a refund the provider made changes, in one transaction."""

    payment_status: PaymentStatus
    order_status: OrderStatus | None  # None: the order keeps its status
    releases_stock: bool
    cancels_order: bool  # the order's status records this refund's cancellation


def refund_completion(
    payment: Payment, refunded: Money, order_status: OrderStatus, *, cancels_order: bool
) -> RefundCompletion:
    """A refund that empties a paid order's payment ends the order: cancelled when the
    refund was a cancellation's, REFUNDED otherwise; its stock goes back on sale. A shipped
    order becomes REFUNDED and its stock stays gone, even when the refund was a cancellation
    the shipment overtook (the goods left: only the money can come back)."""
    payment_status = status_after_refund(payment, refunded)
    if payment_status is not PaymentStatus.REFUNDED or order_status not in _REFUNDABLE_ORDERS:
        return RefundCompletion(payment_status, None, releases_stock=False, cancels_order=False)
    cancels = cancels_order and order_status is OrderStatus.PAID
    event = OrderEvent.CANCELLED if cancels else OrderEvent.REFUNDED_IN_FULL
    target = next_status(payment.order_id, order_status, event)
    return RefundCompletion(
        payment_status,
        target,
        releases_stock=releases_stock(order_status, target),
        cancels_order=cancels,
    )


_REFUNDABLE_ORDERS = frozenset({OrderStatus.PAID, OrderStatus.SHIPPED})
