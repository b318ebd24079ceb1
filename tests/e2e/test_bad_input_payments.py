"""Refusals of PaymentService: payments, refunds, reads, and unsigned webhooks. How a table
runs is tests/e2e/refusals.py."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwt
import psycopg
import pytest
from google.type import money_pb2

from marketplace.order.v1 import order_pb2
from marketplace.payment.v1 import payment_pb2
from server.domain.pagination import encode_page_token
from tests.e2e.payment_checks import stripe_signature
from tests.e2e.refusals import (
    PAYMENTS,
    SQL_INJECTION,
    Call,
    Env,
    Expect,
    Http,
    RefusalTable,
    create_payment,
    denied,
    get_payment,
    invalid,
    list_payments,
    not_found,
    precondition,
    refund_payment,
    unauthenticated,
)
from tests.stack import WEBHOOK_SECRET, bearer

pytestmark = pytest.mark.e2e

CASES = RefusalTable()


def seed_payment(env: Env, order_id: str, customer: str, status: str) -> str:
    """A payment row as if the provider had answered (arrangement, not the thing tested)."""
    payment_id = str(uuid.uuid4())
    with psycopg.connect(env.database_url) as conn:
        conn.execute(
            """
            INSERT INTO payments (id, order_id, customer_id, request_id, request_fingerprint,
                                  status, currency, amount, provider, payment_method,
                                  provider_reference)
            SELECT %s, id, customer_id, %s, %s, %s, currency, total, 'stripe', 'pm_seeded', %s
              FROM orders WHERE id = %s
            """,
            (payment_id, f"seed-{payment_id}", "0" * 64, status, f"pi_{payment_id[:8]}", order_id),
        )
    return payment_id


def _subject(token: str) -> str:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return str(claims["sub"])


@CASES.case("payment-with-a-card-number")
async def payment_with_card_number(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    return create_payment(token, order_id, "4242424242424242"), invalid("payment_method")


@CASES.case("payment-every-field-wrong")
async def payment_every_field_wrong(env: Env) -> tuple[Call, Expect]:
    call = create_payment(env.customer(), "not-a-uuid", "pm_ok; DROP TABLE payments", "")
    return call, invalid("order_id", "request_id", "payment_method")


@CASES.case("payment-unknown-order")
async def payment_unknown_order(env: Env) -> tuple[Call, Expect]:
    order_id = str(uuid.uuid4())
    return create_payment(env.customer(), order_id, "pm_card_visa"), not_found("order", order_id)


@CASES.case("payment-of-another-customers-order")
async def payment_other_customer(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 1)])
    return create_payment(env.customer(), order_id, "pm_card_visa"), not_found("order", order_id)


@CASES.case("payment-without-token")
async def payment_without_token(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 1)])
    return create_payment(None, order_id, "pm_card_visa"), unauthenticated("MISSING_TOKEN")


@CASES.case("payment-by-an-admin-without-customer-role")
async def payment_by_admin(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 1)])
    return create_payment(env.tokens.admin(), order_id, "pm_card_visa"), denied("customer")


@CASES.case("payment-of-a-cancelled-order")
async def payment_cancelled_order(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    await env.orders.CancelOrder(order_pb2.CancelOrderRequest(id=order_id), metadata=bearer(token))
    call = create_payment(token, order_id, "pm_card_visa")
    return call, precondition("ORDER_NOT_PAYABLE", orderId=order_id, status="CANCELLED")


@CASES.case("payment-of-a-paid-order")
async def payment_paid_order(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    seed_payment(env, order_id, _subject(token), "SUCCEEDED")
    with psycopg.connect(env.database_url) as conn:
        conn.execute("UPDATE orders SET status = 'PAID' WHERE id = %s", (order_id,))
    call = create_payment(token, order_id, "pm_card_visa")
    return call, precondition("ORDER_NOT_PAYABLE", status="PAID")


@CASES.case("refund-by-a-customer")
async def refund_by_customer(env: Env) -> tuple[Call, Expect]:
    return refund_payment(env.customer(), str(uuid.uuid4())), denied("admin")


@CASES.case("refund-unknown-payment")
async def refund_unknown_payment(env: Env) -> tuple[Call, Expect]:
    payment_id = str(uuid.uuid4())
    return refund_payment(env.tokens.admin(), payment_id), not_found("payment", payment_id)


@CASES.case("refund-negative-amount")
async def refund_negative_amount(env: Env) -> tuple[Call, Expect]:
    amount = money_pb2.Money(currency_code="USD", units=-5)
    return refund_payment(env.tokens.admin(), str(uuid.uuid4()), amount), invalid("amount")


@CASES.case("refund-not-a-currency")
async def refund_not_a_currency(env: Env) -> tuple[Call, Expect]:
    amount = money_pb2.Money(currency_code="XXQ", units=5)
    return refund_payment(env.tokens.admin(), str(uuid.uuid4()), amount), invalid("amount")


@CASES.case("refund-of-a-failed-payment")
async def refund_failed_payment(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    payment_id = seed_payment(env, order_id, _subject(token), "FAILED")
    call = refund_payment(env.tokens.admin(), payment_id)
    return call, precondition("PAYMENT_NOT_REFUNDABLE", paymentId=payment_id, status="FAILED")


@CASES.case("refund-more-than-paid")
async def refund_more_than_paid(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])  # 10.00 USD
    payment_id = seed_payment(env, order_id, _subject(token), "SUCCEEDED")
    amount = money_pb2.Money(currency_code="USD", units=10, nanos=10_000_000)
    call = refund_payment(env.tokens.admin(), payment_id, amount)
    return call, precondition("REFUND_EXCEEDS_PAYMENT", paymentId=payment_id)


@CASES.case("get-payment-malformed-id")
async def get_payment_malformed(env: Env) -> tuple[Call, Expect]:
    return get_payment(env.customer(), SQL_INJECTION), invalid("id")


@CASES.case("get-another-customers-payment")
async def get_payment_of_other(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    payment_id = seed_payment(env, order_id, _subject(token), "FAILED")
    return get_payment(env.customer(), payment_id), not_found("payment", payment_id)


@CASES.case("list-payments-of-another-customers-order")
async def list_payments_of_other(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 1)])
    return list_payments(env.customer(), order_id), not_found("order", order_id)


@CASES.case("list-payments-foreign-page-token")
async def list_payments_foreign_token(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    foreign = encode_page_token("payments", str(uuid.uuid4()), {"t": "x", "id": "y"})
    return list_payments(token, order_id, foreign), invalid("page_token")


@CASES.case("webhook-without-signature")
async def webhook_without_signature(env: Env) -> tuple[Call, Expect]:
    body = json.dumps({"id": "evt_forged", "type": "payment_intent.succeeded"})
    request = payment_pb2.HandleProviderWebhookRequest()
    request.http_body.content_type = "application/json"
    request.http_body.data = body.encode()
    call = Call(
        f"{PAYMENTS}/HandleProviderWebhook",
        request,
        Http("POST", "/v1/payments:webhook", content=body),
    )
    return call, unauthenticated("INVALID_SIGNATURE")


def signed_webhook(body: str, *, at: int | None = None, secret: str = WEBHOOK_SECRET) -> Call:
    """A webhook delivery of `body` with a `Stripe-Signature` (the stack's secret unless
    told), as Stripe signs it: the signature is right, whatever the body says."""
    request = payment_pb2.HandleProviderWebhookRequest()
    request.http_body.content_type = "application/json"
    request.http_body.data = body.encode()
    signature = stripe_signature(body.encode(), secret=secret, at=at)
    return Call(
        f"{PAYMENTS}/HandleProviderWebhook",
        request,
        Http("POST", "/v1/payments:webhook", content=body),
        headers=(("stripe-signature", signature),),
    )


def _event(**fields: Any) -> str:
    event: dict[str, Any] = {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": "payment_intent.succeeded",
        "data": {"object": {"id": f"pi_{uuid.uuid4().hex[:24]}", "object": "payment_intent"}},
    }
    event.update(fields)
    return json.dumps({name: value for name, value in event.items() if value is not None})


@CASES.case("webhook-signed-with-another-secret")
async def webhook_other_secret(env: Env) -> tuple[Call, Expect]:
    call = signed_webhook(_event(), secret="whsec_" + "not-the-secret" * 3)
    return call, unauthenticated("INVALID_SIGNATURE")


@CASES.case("webhook-signed-an-hour-ago")
async def webhook_signed_long_ago(env: Env) -> tuple[Call, Expect]:
    return signed_webhook(_event(), at=int(time.time()) - 3600), unauthenticated(
        "INVALID_SIGNATURE"
    )


@CASES.case("webhook-signed-an-hour-ahead")
async def webhook_signed_ahead(env: Env) -> tuple[Call, Expect]:
    return signed_webhook(_event(), at=int(time.time()) + 3600), unauthenticated(
        "INVALID_SIGNATURE"
    )


@CASES.case("webhook-signed-not-json")
async def webhook_signed_not_json(env: Env) -> tuple[Call, Expect]:
    return signed_webhook("payment_intent.succeeded pi_123"), invalid("http_body")


@CASES.case("webhook-signed-json-array")
async def webhook_signed_array(env: Env) -> tuple[Call, Expect]:
    return signed_webhook(json.dumps([json.loads(_event())])), invalid("http_body")


@CASES.case("webhook-signed-without-type")
async def webhook_signed_without_type(env: Env) -> tuple[Call, Expect]:
    return signed_webhook(_event(type=None)), invalid("type")


@CASES.case("webhook-signed-without-id")
async def webhook_signed_without_id(env: Env) -> tuple[Call, Expect]:
    return signed_webhook(_event(id=None)), invalid("id")


@CASES.case("webhook-signed-type-not-a-string")
async def webhook_signed_type_mistyped(env: Env) -> tuple[Call, Expect]:
    return signed_webhook(_event(type=["payment_intent.succeeded"])), invalid("type")


@CASES.case("webhook-signed-data-not-an-object")
async def webhook_signed_data_mistyped(env: Env) -> tuple[Call, Expect]:
    return signed_webhook(_event(data="pi_123")), invalid("data")


@CASES.case("webhook-signed-intent-without-id")
async def webhook_signed_intent_without_id(env: Env) -> tuple[Call, Expect]:
    body = _event(data={"object": {"object": "payment_intent", "status": "succeeded"}})
    return signed_webhook(body), invalid("data.object.id")


@CASES.case("webhook-signed-intent-id-a-number")
async def webhook_signed_intent_id_mistyped(env: Env) -> tuple[Call, Expect]:
    body = _event(data={"object": {"id": 12345, "object": "payment_intent"}})
    return signed_webhook(body), invalid("data.object.id")


@CASES.case("webhook-signed-5000-character-id")
async def webhook_signed_long_id(env: Env) -> tuple[Call, Expect]:
    return signed_webhook(_event(id="evt_" + "a" * 5000)), invalid("id")


@CASES.case("webhook-signed-5000-character-intent-id")
async def webhook_signed_long_intent_id(env: Env) -> tuple[Call, Expect]:
    body = _event(data={"object": {"id": "pi_" + "a" * 5000, "object": "payment_intent"}})
    return signed_webhook(body), invalid("data.object.id")


test_bad_input_is_refused_precisely_and_changes_nothing = CASES.test()
