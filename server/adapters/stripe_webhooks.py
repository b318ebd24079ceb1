"""Stripe webhook events: signature verification and translation to ProviderEvent.

The signature is checked by the Stripe SDK (`Stripe-Signature`: an HMAC-SHA256 of
"<timestamp>.<raw body>" with the endpoint secret), over the raw bytes exactly as
received: re-serialized JSON would not verify. Its timestamp must lie within the tolerance
on either side of now; the SDK checks only the past, so a signature dated ahead would
otherwise stay replayable until that date.

A correctly signed body is still only trusted to say which object an event is about: it is
parsed strictly (InvalidArgument naming the field when it is not a Stripe event), and the
use case reads the object back from the provider before acting on it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import stripe
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from server.domain.errors import FieldViolation, InvalidArgument
from server.services.providers import InvalidSignature, ProviderEvent

# Events whose object is a PaymentIntent and that say how a charge ended.
_INTENT_OUTCOMES = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
        "payment_intent.processing",
    }
)
DEFAULT_TOLERANCE_SECONDS = 300
# The request field that carries the event, for violations of the body as a whole.
BODY_FIELD = "http_body"

# Stripe's ids are letters, digits and underscores (evt_..., pi_...); provider_events.id is
# varchar(255) and its type varchar(100).
_StripeId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+$", max_length=255)]
_EventType = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.]+$", max_length=100)]
_IntentId = Annotated[str, StringConstraints(pattern=r"^pi_[A-Za-z0-9_]+$", max_length=255)]


class _Strict(BaseModel):
    # Stripe adds fields over time: unknown ones are ignored, known ones must be well typed.
    model_config = ConfigDict(strict=True, extra="ignore")


class _Data(_Strict):
    object: dict[str, Any]


class _Event(_Strict):
    id: _StripeId
    type: _EventType
    data: _Data


class _IntentObject(_Strict):
    id: _IntentId


class StripeWebhooks:
    def __init__(self, secret: str, *, tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS):
        self._secret = secret
        self._tolerance_seconds = tolerance_seconds

    def verify(self, payload: bytes, signature: str) -> ProviderEvent:
        """The event in `payload`: InvalidSignature when it is not Stripe's own (or signed
        too far from now), InvalidArgument when it is signed but not a Stripe event."""
        self._check_signature(payload, signature)
        return _parse_event(payload)

    def _check_signature(self, payload: bytes, signature: str) -> None:
        if not signature:
            raise InvalidSignature("the Stripe-Signature header is missing")
        try:
            text = payload.decode()
        except UnicodeDecodeError:  # Stripe signs UTF-8 JSON: this was never its body
            raise InvalidSignature("the webhook body is not UTF-8") from None
        try:
            stripe.WebhookSignature.verify_header(
                text, signature, self._secret, tolerance=self._tolerance_seconds
            )
        except stripe.SignatureVerificationError as error:
            raise InvalidSignature(str(error.user_message or error)) from None
        signed_at = _timestamp(signature)
        if signed_at is None or signed_at > time.time() + self._tolerance_seconds:
            raise InvalidSignature("the signature's timestamp is too far in the future")


def _timestamp(signature: str) -> int | None:
    """The `t=` of a Stripe-Signature header the SDK has verified."""
    for item in signature.split(","):
        name, _, value = item.partition("=")
        if name.strip() == "t":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _parse_event(payload: bytes) -> ProviderEvent:
    try:
        event = _Event.model_validate_json(payload)
    except ValidationError as error:
        raise InvalidArgument(_violations(error)) from None
    reference = None
    if event.type in _INTENT_OUTCOMES:
        try:
            reference = _IntentObject.model_validate(event.data.object).id
        except ValidationError as error:
            raise InvalidArgument(_violations(error, within=("data", "object"))) from None
    return ProviderEvent(id=event.id, type=event.type, intent_reference=reference)


def _violations(error: ValidationError, within: tuple[str, ...] = ()) -> list[FieldViolation]:
    """pydantic's errors as field violations, named by their path in the event's JSON."""
    violations = []
    for problem in error.errors(include_url=False):
        path = [*within, *(str(part) for part in problem["loc"])]
        if path:
            violations.append(FieldViolation(".".join(path), problem["msg"]))
        elif problem["type"] == "json_invalid":
            violations.append(FieldViolation(BODY_FIELD, f"must be JSON: {problem['msg']}"))
        else:
            violations.append(FieldViolation(BODY_FIELD, "must be a JSON object (a Stripe event)"))
    return violations
