"""How the Stripe adapter reads Stripe's answers, without any network."""

from __future__ import annotations

import pytest
import stripe

from server.adapters.stripe_answers import Transient, refund_from_stripe, translate_error
from server.domain.payments import RefundStatus
from server.services.providers import ProviderRejected


def _refund_in(status: str) -> stripe.Refund:
    return stripe.Refund.construct_from(
        {"id": "re_1", "status": status, "amount": 2500, "payment_intent": "pi_1", "metadata": {}},
        "sk_test_x",
    )


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("succeeded", RefundStatus.SUCCEEDED),
        ("pending", RefundStatus.PENDING),
        ("requires_action", RefundStatus.PENDING),
        ("failed", RefundStatus.FAILED),
        ("canceled", RefundStatus.FAILED),
    ],
)
def test_only_final_refund_states_are_success_or_failure(
    status: str, expected: RefundStatus
) -> None:
    refund = refund_from_stripe(_refund_in(status), "pi_1")
    assert refund.status is expected
    assert (refund.reference, refund.intent_reference, refund.amount_minor) == (
        "re_1",
        "pi_1",
        2500,
    )


def test_a_409_is_a_request_in_flight_that_may_yet_act() -> None:
    in_use = stripe.IdempotencyError(
        "Keys for idempotent requests can only be used ...", http_status=409
    )
    translated = translate_error("confirm", in_use)
    assert isinstance(translated, Transient)
    assert translated.maybe_acted


def test_a_400_is_a_refusal() -> None:
    bad = stripe.InvalidRequestError(
        "No such payment_intent", "intent", code="resource_missing", http_status=400
    )
    translated = translate_error("confirm", bad)
    assert isinstance(translated, ProviderRejected)
    assert translated.status == 400
