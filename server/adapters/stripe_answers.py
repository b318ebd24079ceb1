"""Stripe's answers in the payment provider port's terms: its objects as ProviderIntent and
ProviderRefund, its errors as the port's failures (or a transient one worth retrying)."""

from __future__ import annotations

from collections.abc import Mapping

import httpx
import stripe

from server.domain.payments import RefundStatus
from server.services.providers import (
    CardDeclined,
    IntentStatus,
    ProviderIntent,
    ProviderRefund,
    ProviderRejected,
)

_STATUSES: Mapping[str, IntentStatus] = {
    "requires_confirmation": IntentStatus.REQUIRES_CONFIRMATION,
    "processing": IntentStatus.PROCESSING,
    "requires_action": IntentStatus.PROCESSING,
    "requires_capture": IntentStatus.PROCESSING,
    "succeeded": IntentStatus.SUCCEEDED,
    "requires_payment_method": IntentStatus.FAILED,
    "canceled": IntentStatus.FAILED,
}

# Bodies of 503s that a proxy between us and the provider (our egress Envoy) generates itself
# when it never forwarded the request: an injected fault, or no connection to the upstream
# ("reset reason: remote connection failure"). Envoy's other resets, such as "connection
# termination", can come after the request went out, so they stay ambiguous.
_NOT_FORWARDED_MARKERS = ("fault filter abort", "connection failure")

# httpx failures that happen before a byte of the request left: nothing can have been acted on.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Transient(Exception):
    """One attempt failed in a way worth retrying; `maybe_acted` says whether the provider
    may have carried it out anyway."""

    def __init__(self, operation: str, cause: BaseException, *, maybe_acted: bool) -> None:
        # The SDK wraps every network error in one long generic message; the cause says more.
        if isinstance(cause, stripe.APIConnectionError) and cause.__cause__ is not None:
            cause = cause.__cause__
        detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        super().__init__(f"{operation}: {detail}")
        self.maybe_acted = maybe_acted


def translate_error(operation: str, error: stripe.StripeError) -> Exception:
    status = error.http_status
    if isinstance(error, stripe.APIConnectionError):
        return Transient(operation, error, maybe_acted=not isinstance(error.__cause__, _NOT_SENT))
    if status is None or status >= 500:
        body = error.http_body or ""
        forwarded = not any(marker in body for marker in _NOT_FORWARDED_MARKERS)
        return Transient(operation, error, maybe_acted=forwarded)
    if status == 409:
        # Another request with the same idempotency key is still in flight (our own retry
        # racing an unanswered attempt): it may yet act, so look at the provider's state
        # before sending again, as after a timeout.
        return Transient(operation, error, maybe_acted=True)
    headers = {name.lower(): value for name, value in (error.headers or {}).items()}
    # 429: refused before being looked at; Stripe also marks other refusals that a retry
    # will get past with Stripe-Should-Retry (409s are handled above: they may yet act).
    if status == 429 or headers.get("stripe-should-retry") == "true":
        return Transient(operation, error, maybe_acted=False)
    code = error.code or ""
    message = _message(error)
    if isinstance(error, stripe.CardError):
        return CardDeclined(code or "card_declined", message)
    param = getattr(error, "param", None)
    if code == "resource_missing" and param == "payment_method":
        return CardDeclined(code, message)
    return ProviderRejected(code, message, status)


def _message(error: stripe.StripeError) -> str:
    details = error.error
    message = getattr(details, "message", None) if details is not None else None
    return message if isinstance(message, str) else str(error)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def intent_from_stripe(raw: stripe.PaymentIntent) -> ProviderIntent:
    """A PaymentIntent as the port sees it, from an API answer or a webhook event."""
    # A status Stripe adds later is neither success nor failure to us: still in progress,
    # for reconciliation to look at again.
    status = _STATUSES.get(raw.status, IntentStatus.PROCESSING)
    failure = raw.last_payment_error
    failed = status is IntentStatus.FAILED and failure is not None
    return ProviderIntent(
        reference=raw.id,
        status=status,
        amount_minor=raw.amount,
        currency=raw.currency.upper(),
        failure_code=_text(getattr(failure, "code", None)) if failed else "",
        failure_message=_text(getattr(failure, "message", None)) if failed else "",
        metadata=_metadata(raw.metadata),
    )


def charged(intent: ProviderIntent) -> ProviderIntent:
    """A confirm that ended in a decline is a CardDeclined, whichever attempt saw it."""
    if intent.status is IntentStatus.FAILED and intent.failure_code:
        raise CardDeclined(intent.failure_code, intent.failure_message)
    return intent


# Stripe's final refund states; the others (pending, requires_action) still move money later.
_REFUND_STATUS = {
    "succeeded": RefundStatus.SUCCEEDED,
    "failed": RefundStatus.FAILED,
    "canceled": RefundStatus.FAILED,
}


def refund_from_stripe(raw: stripe.Refund, intent_reference: str) -> ProviderRefund:
    intent = raw.payment_intent
    return ProviderRefund(
        reference=raw.id,
        intent_reference=(intent if isinstance(intent, str) else intent.id)
        if intent is not None
        else intent_reference,
        amount_minor=raw.amount,
        status=_REFUND_STATUS.get(raw.status or "", RefundStatus.PENDING),
        metadata=_metadata(raw.metadata),
    )


def _metadata(raw: stripe.StripeObject | None) -> dict[str, str]:
    if raw is None:
        return {}
    return {str(key): str(value) for key, value in raw.to_dict().items()}
