"""Refusals before any service decides: tokens that are missing, expired, forged or without a
role, and requests the transports themselves cannot carry. How a table runs is
tests/e2e/refusals.py."""

from __future__ import annotations

import uuid

import httpx
import pytest
from google.rpc import code_pb2

from server.api.auth import issue_development_token
from tests.conftest import Tokens, insert_product, stock_of
from tests.e2e.refusals import (
    CATALOG,
    ORDERS,
    REST,
    Call,
    Env,
    Expect,
    Http,
    RefusalTable,
    auth_header,
    create_order,
    denied,
    length_delimited,
    list_orders,
    list_products,
    unauthenticated,
    varint,
)
from tests.stack import Stack

pytestmark = pytest.mark.e2e

CASES = RefusalTable()


# Authentication


@CASES.case("no-token")
async def no_token(env: Env) -> tuple[Call, Expect]:
    return create_order(None, [(env.product(), 1)]), unauthenticated("MISSING_TOKEN")


@CASES.case("expired-token")
async def expired_token(env: Env) -> tuple[Call, Expect]:
    call = create_order(
        env.tokens.expired(f"bad-input-{uuid.uuid4().hex[:8]}"), [(env.product(), 1)]
    )
    return call, unauthenticated("TOKEN_EXPIRED")


@CASES.case("wrong-signature")
async def wrong_signature(env: Env) -> tuple[Call, Expect]:
    token = env.tokens.wrong_signature(f"bad-input-{uuid.uuid4().hex[:8]}")
    return create_order(token, [(env.product(), 1)]), unauthenticated("INVALID_TOKEN")


@CASES.case("basic-authorization-header")
async def basic_authorization(env: Env) -> tuple[Call, Expect]:
    call = create_order(None, [(env.product(), 1)], authorization="Basic abc")
    return call, unauthenticated("MISSING_TOKEN")


@CASES.case("two-authorization-entries")
async def two_authorization_entries(env: Env) -> tuple[Call, Expect]:
    """A valid token and another one: which of them would be the caller is ambiguous, so
    neither is (gRPC used to take the last entry)."""
    intruder, victim = env.customer(), env.customer()
    call = create_order(None, [(env.product(), 1)])
    twice = (f"Bearer {intruder}", f"Bearer {victim}")
    return Call(call.rpc, call.request, call.http, twice), unauthenticated("INVALID_TOKEN")


@CASES.case("roleless-token-lists-orders")
async def roleless_token(env: Env) -> tuple[Call, Expect]:
    token = issue_development_token(
        env.tokens.secret, f"guest-{uuid.uuid4().hex[:8]}", ["guest"], lifetime_seconds=600
    )
    return list_orders(token), denied("customer")


# The transports themselves


@CASES.case("malformed-body")
async def malformed_body(env: Env) -> tuple[Call, Expect]:
    """REST: JSON that does not parse. gRPC: a message that does not parse (a truncated
    length-delimited field). Both are the caller's fault: INVALID_ARGUMENT, never
    INTERNAL/UNKNOWN."""
    corrupt = varint(1 << 3 | 2) + varint(200) + b"short"
    http = Http("POST", "/v1/orders", content='{"requestId": "x", "items": [')
    call = Call(f"{ORDERS}/CreateOrder", corrupt, http, auth_header(env.customer()))
    return call, Expect(code_pb2.INVALID_ARGUMENT, envoy_status=400, envoy_text="")


@CASES.case("unknown-query-parameter", transports=(REST,))
async def unknown_query_parameter(env: Env) -> tuple[Call, Expect]:
    call = list_products(page_size=1)
    http = Http("GET", "/v1/products", params={"pageSize": "1", "sortBy": "price"})
    return (
        Call(call.rpc, call.request, http),
        Expect(code_pb2.INVALID_ARGUMENT, envoy_status=400, envoy_text="sortBy"),
    )


@CASES.case("unknown-route")
async def unknown_route(env: Env) -> tuple[Call, Expect]:
    order_id = str(uuid.uuid4())
    http = Http("POST", f"/v1/orders/{order_id}:refund", json={})
    call = Call(f"{ORDERS}/RefundOrder", b"", http, auth_header(env.customer()))
    return call, Expect(
        code_pb2.UNIMPLEMENTED,
        envoy_status=404,
        envoy_text="Could not resolve",
        rest_code=code_pb2.NOT_FOUND,
    )


# Sizes and shapes the edge refuses (docs/operations.md, "Limits at the edge")


def too_large(http_status: int) -> Expect:
    """Envoy's 413/431 (INVALID_ARGUMENT over REST); gRPC's own RESOURCE_EXHAUSTED."""
    return Expect(
        code_pb2.RESOURCE_EXHAUSTED,
        envoy_status=http_status,
        envoy_text="larger than this API accepts",
        rest_code=code_pb2.INVALID_ARGUMENT,
    )


@CASES.case("body-too-large")
async def body_too_large(env: Env) -> tuple[Call, Expect]:
    """REST: a body over Envoy's 1 MiB cap (413). gRPC: a message over the server's 4 MiB
    (gRPC's own RESOURCE_EXHAUSTED, before any of our code runs)."""
    call = create_order(env.customer(), [(env.product(), 1)], request_id="r" * (5 * 1024 * 1024))
    return call, too_large(413)


@CASES.case("headers-too-large")
async def headers_too_large(env: Env) -> tuple[Call, Expect]:
    """REST: headers over Envoy's 16 KiB (431). gRPC: metadata over the server's 64 KiB."""
    call = create_order(None, [(env.product(), 1)], authorization="Bearer " + "a" * 70_000)
    return call, too_large(431)


@CASES.case("invalid-utf8")
async def invalid_utf8(env: Env) -> tuple[Call, Expect]:
    """A string that is not UTF-8: in the JSON body, or in the protobuf message."""
    wire = length_delimited(1, b"\xff\xfe")
    http = Http("POST", "/v1/orders", content=b'{"requestId": "\xff\xfe", "items": []}')
    call = Call(f"{ORDERS}/CreateOrder", wire, http, auth_header(env.customer()))
    return call, Expect(code_pb2.INVALID_ARGUMENT, envoy_status=400, envoy_text="UTF-8")


@CASES.case("lone-surrogate", transports=(REST,))
async def lone_surrogate(env: Env) -> tuple[Call, Expect]:
    http = Http("POST", "/v1/orders", content='{"requestId": "\\ud800", "items": []}')
    call = Call(f"{ORDERS}/CreateOrder", b"", http, auth_header(env.customer()))
    return call, Expect(code_pb2.INVALID_ARGUMENT, envoy_status=400, envoy_text="surrogate")


@CASES.case("nesting-too-deep", transports=(REST,))
async def nesting_too_deep(env: Env) -> tuple[Call, Expect]:
    deep = '{"requestId": "x", "items": [], "deep": ' + "[" * 200 + "]" * 200 + "}"
    call = Call(f"{ORDERS}/CreateOrder", b"", Http("POST", "/v1/orders", content=deep))
    return call, Expect(code_pb2.INVALID_ARGUMENT, envoy_status=400, envoy_text="too deep")


@CASES.case("int64-overflow", transports=(REST,))
async def int64_overflow(env: Env) -> tuple[Call, Expect]:
    """gRPC cannot carry it: a varint holds 64 bits."""
    http = Http(
        "POST",
        f"/v1/products/{env.product()}:adjustStock",
        content='{"delta": "99999999999999999999", "reason": "x", "requestId": "x"}',
    )
    call = Call(f"{CATALOG}/AdjustStock", b"", http, auth_header(env.tokens.admin()))
    return call, Expect(code_pb2.INVALID_ARGUMENT, envoy_status=400, envoy_text="TYPE_INT64")


@CASES.case("method-not-allowed", transports=(REST,))
async def method_not_allowed(env: Env) -> tuple[Call, Expect]:
    call = Call(f"{CATALOG}/DeleteProduct", b"", Http("DELETE", f"/v1/products/{env.product()}"))
    return call, Expect(code_pb2.UNIMPLEMENTED, envoy_status=405, envoy_text="not allowed")


test_bad_input_is_refused_precisely_and_changes_nothing = CASES.test()


async def test_unknown_json_fields_are_refused_and_cannot_change_the_customer(
    stack: Stack, rest: httpx.AsyncClient, tokens: Tokens
) -> None:
    """A REST body naming fields its message does not define is refused at the edge (Envoy's
    Lua filter, ahead of the transcoder, which would drop them): UNKNOWN_FIELD, nothing
    placed. Without them the customer is the token's subject, whatever the body says."""
    product_id = insert_product(stack.database_url, stock=5)
    subject = f"honest-{uuid.uuid4().hex[:8]}"
    order = {"requestId": str(uuid.uuid4()), "items": [{"productId": product_id, "quantity": 1}]}
    headers = {"authorization": f"Bearer {tokens.customer(subject)}"}
    refused = await rest.post(
        "/v1/orders",
        json={**order, "customerId": "somebody-else", "status": "ORDER_STATUS_PAID"},
        headers=headers,
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["details"][0]["reason"] == "UNKNOWN_FIELD"
    assert stock_of(stack.database_url, product_id) == 5

    response = await rest.post("/v1/orders", json=order, headers=headers)
    assert response.status_code == 200, response.text
    placed = response.json()["order"]
    assert placed["customerId"] == subject
    assert placed["status"] == "ORDER_STATUS_PENDING_PAYMENT"
    assert stock_of(stack.database_url, product_id) == 4
