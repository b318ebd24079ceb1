"""Stripe webhook verification and parsing, without I/O: what a signed body may say, and
what it may not. Signatures are made here as Stripe makes them (HMAC-SHA256 of
"<t>.<body>"), independently of the SDK the adapter verifies them with."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import pytest

from server.adapters.stripe_webhooks import DEFAULT_TOLERANCE_SECONDS, StripeWebhooks
from server.domain.errors import InvalidArgument
from server.services.providers import InvalidSignature, ProviderEvent

SECRET = "whsec_unit_" + "s" * 24


def sign(body: bytes, at: float | None = None, secret: str = SECRET) -> str:
    timestamp = int(time.time() if at is None else at)
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def event(**fields: Any) -> bytes:
    body: dict[str, Any] = {
        "id": "evt_1NxUnit",
        "object": "event",
        "type": "payment_intent.succeeded",
        "data": {"object": {"id": "pi_1NxUnit", "object": "payment_intent", "amount": 1000}},
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def violations(body: bytes) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as refused:
        StripeWebhooks(SECRET).verify(body, sign(body))
    return {v.field: v.description for v in refused.value.violations}


def test_an_intent_event_names_its_intent_and_nothing_of_its_outcome() -> None:
    body = event()
    assert StripeWebhooks(SECRET).verify(body, sign(body)) == ProviderEvent(
        id="evt_1NxUnit", type="payment_intent.succeeded", intent_reference="pi_1NxUnit"
    )


def test_other_events_name_no_intent() -> None:
    body = event(type="charge.refunded", data={"object": {"object": "balance"}})
    assert StripeWebhooks(SECRET).verify(body, sign(body)).intent_reference is None


@pytest.mark.parametrize(
    ("when", "accepted"),
    [
        (-DEFAULT_TOLERANCE_SECONDS - 60, False),
        (-DEFAULT_TOLERANCE_SECONDS + 60, True),
        (DEFAULT_TOLERANCE_SECONDS - 60, True),
        (DEFAULT_TOLERANCE_SECONDS + 60, False),
        (365 * 24 * 3600, False),
    ],
)
def test_signatures_dated_too_far_either_side_of_now_are_refused(when: int, accepted: bool) -> None:
    body = event()
    signature = sign(body, at=time.time() + when)
    if accepted:
        StripeWebhooks(SECRET).verify(body, signature)
    else:
        with pytest.raises(InvalidSignature):
            StripeWebhooks(SECRET).verify(body, signature)


@pytest.mark.parametrize(
    "signature",
    ["", "t=abc,v1=00", "v1=00", sign(event(), secret="whsec_other_" + "o" * 24)],
)
def test_a_body_not_signed_with_the_secret_is_refused_before_it_is_read(signature: str) -> None:
    with pytest.raises(InvalidSignature):
        StripeWebhooks(SECRET).verify(b"[not even json", signature)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "http_body"),
        (b"[]", "http_body"),
        (b'"evt_1"', "http_body"),
        (b"{" * 10_000, "http_body"),
        (event(type=None), "type"),
        (event(id=None), "id"),
        (event(data=None), "data"),
        (event(type=7), "type"),
        (event(id=["evt_1"]), "id"),
        (event(id="evt_" + "a" * 5000), "id"),
        (event(id="evt_1; DROP TABLE payments"), "id"),
        (event(type="x" * 101), "type"),
        (event(data="pi_1"), "data"),
        (event(data={"object": "pi_1"}), "data.object"),
        (event(data={"object": {"object": "payment_intent"}}), "data.object.id"),
        (event(data={"object": {"id": 12345}}), "data.object.id"),
        (event(data={"object": {"id": "pi_" + "a" * 5000}}), "data.object.id"),
        (event(data={"object": {"id": "ch_1NxUnit"}}), "data.object.id"),
    ],
)
def test_a_signed_body_that_is_not_a_stripe_event_names_the_field(body: bytes, field: str) -> None:
    problems = violations(body)
    assert list(problems) == [field]
    assert all(problems.values())
