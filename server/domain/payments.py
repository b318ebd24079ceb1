"""Payments: what a valid payment or refund request is, and how a payment's status moves."""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from server.domain.errors import FailedPrecondition, FieldViolation, InvalidArgument
from server.domain.money import Money
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

# ISO 4217 minor-unit exponents that differ from 2, as card providers count them.
_ZERO_DECIMAL = frozenset(
    [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]
)
_THREE_DECIMAL = frozenset(["BHD", "JOD", "KWD", "OMR", "TND"])


class PaymentStatus(enum.StrEnum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REFUNDED = "REFUNDED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"


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

    def fingerprint(self) -> str:
        amount = "rest" if self.amount is None else f"{self.amount.currency}{self.amount.amount}"
        return fingerprint_of(f"refund;{self.payment_id};{amount};{self.reason}")


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
    payment_id: str, request_id: str, amount: Money | None, amount_problems: list[str], reason: str
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
    return RefundRequest(canonical_id, request_id, amount, reason)


def minor_unit_exponent(currency: str) -> int:
    if currency in _ZERO_DECIMAL:
        return 0
    if currency in _THREE_DECIMAL:
        return 3
    return 2


def is_whole_minor_units(money: Money) -> bool:
    scaled = money.amount.scaleb(minor_unit_exponent(money.currency))
    return scaled == scaled.to_integral_value()


def to_minor_units(money: Money) -> int:
    """The amount as a card provider counts it (cents); refuses what it cannot charge."""
    if not is_whole_minor_units(money):
        raise FailedPrecondition(
            f"{money.amount} {money.currency} is not a whole number of minor units",
            reason="AMOUNT_NOT_CHARGEABLE",
            metadata={"currency": money.currency, "amount": str(money.amount)},
        )
    return int(money.amount.scaleb(minor_unit_exponent(money.currency)))


def from_minor_units(currency: str, minor: int) -> Money:
    return Money(currency, Decimal(minor).scaleb(-minor_unit_exponent(currency)))


def refund_amount(payment: Payment, requested: Money | None) -> Money:
    """How much a refund takes back: `requested`, or all that is left when omitted."""
    if payment.status not in (PaymentStatus.SUCCEEDED, PaymentStatus.PARTIALLY_REFUNDED):
        raise FailedPrecondition(
            f"payment {payment.id} is {payment.status.value}; only a succeeded payment"
            " can be refunded",
            reason="PAYMENT_NOT_REFUNDABLE",
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
            reason="REFUND_EXCEEDS_PAYMENT",
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
        reason="PAYMENT_IN_PROGRESS",
        metadata={"orderId": order_id, "paymentId": payment_id},
    )


def refund_in_progress(payment_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"a refund of payment {payment_id} is in progress; wait for its outcome",
        reason="REFUND_IN_PROGRESS",
        metadata={"paymentId": payment_id},
    )
