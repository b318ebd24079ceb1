"""Stripe webhook events: signature verification and translation to ProviderEvent.

The signature is checked by the Stripe SDK (`Stripe-Signature`: an HMAC-SHA256 of
"<timestamp>.<raw body>" with the endpoint secret, and a timestamp tolerance against
replays), over the raw bytes exactly as received: re-serialized JSON would not verify.
"""

from __future__ import annotations

import stripe

from server.adapters.stripe_answers import intent_from_stripe
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


class StripeWebhooks:
    def __init__(self, secret: str, *, tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS):
        self._secret = secret
        self._tolerance_seconds = tolerance_seconds

    def verify(self, payload: bytes, signature: str) -> ProviderEvent:
        """The event in `payload`, or InvalidSignature when it is not Stripe's own."""
        if not signature:
            raise InvalidSignature("the Stripe-Signature header is missing")
        try:
            event = stripe.Webhook.construct_event(
                payload, signature, self._secret, tolerance=self._tolerance_seconds
            )
        except stripe.SignatureVerificationError as error:
            raise InvalidSignature(str(error.user_message or error)) from None
        except ValueError:  # signed, but not JSON: still not an event we can act on
            raise InvalidSignature("the webhook body is not a Stripe event") from None
        intent = None
        if event.type in _INTENT_OUTCOMES:
            intent = intent_from_stripe(event.data.object)
        return ProviderEvent(id=event.id, type=event.type, intent=intent)
