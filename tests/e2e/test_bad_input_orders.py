"""Refusals of OrderService: quantities, lines, whose order it is, and list page tokens.
How a table runs is tests/e2e/refusals.py."""

from __future__ import annotations

import uuid

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2

from marketplace.catalog.v1 import catalog_pb2
from marketplace.order.v1 import order_pb2
from server.domain.pagination import encode_page_token
from tests.conftest import Tokens, stock_of
from tests.e2e.refusals import (
    BOTH,
    GRPC,
    ORDERS,
    SQL_INJECTION,
    Call,
    Env,
    Expect,
    Http,
    RefusalTable,
    auth_header,
    cancel_order,
    create_order,
    denied,
    get_order,
    invalid,
    length_delimited,
    list_orders,
    not_found,
    over_rest,
    precondition,
    refusal_over_grpc,
    varint,
)
from tests.e2e.statuses import code_name, details_of, status_of_json
from tests.stack import Stack, bearer

pytestmark = pytest.mark.e2e

CASES = RefusalTable()


@CASES.case("quantity-zero")
async def quantity_zero(env: Env) -> tuple[Call, Expect]:
    return create_order(env.customer(), [(env.product(), 0)]), invalid("items[0].quantity")


@CASES.case("quantity-negative")
async def quantity_negative(env: Env) -> tuple[Call, Expect]:
    return create_order(env.customer(), [(env.product(), -1)]), invalid("items[0].quantity")


@CASES.case("quantity-1001")
async def quantity_over_limit(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.customer(), [(env.product(stock=5000), 1001)])
    return call, invalid("items[0].quantity")


@CASES.case("quantity-int32-max")
async def quantity_int32_max(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.customer(), [(env.product(), 2**31 - 1)])
    return call, invalid("items[0].quantity")


@CASES.case("quantity-2pow40")
async def quantity_beyond_int32(env: Env) -> tuple[Call, Expect]:
    """REST: JSON can carry 2**40 for an int32 field, and Envoy must refuse it (400) rather
    than pass on a truncated number. gRPC: the same varint on the wire; protobuf parses an
    int32 by truncation (2**40 -> 0), which the server must still refuse."""
    product_id = env.product()
    token = env.customer()
    request_id = str(uuid.uuid4())
    item = length_delimited(1, product_id.encode()) + varint(2 << 3 | 0) + varint(2**40)
    wire = length_delimited(1, request_id.encode()) + length_delimited(2, item)
    body = {"requestId": request_id, "items": [{"productId": product_id, "quantity": 2**40}]}
    call = Call(
        f"{ORDERS}/CreateOrder", wire, Http("POST", "/v1/orders", json=body), auth_header(token)
    )
    expect = invalid("items[0].quantity")
    return call, Expect(
        expect.code, fields=expect.fields, envoy_status=400, envoy_text="items[0].quantity"
    )


# Lines


@CASES.case("no-items")
async def no_items(env: Env) -> tuple[Call, Expect]:
    return create_order(env.customer(), []), invalid("items")


@CASES.case("101-items")
async def too_many_items(env: Env) -> tuple[Call, Expect]:
    items = [(str(uuid.uuid4()), 1) for _ in range(101)]
    return create_order(env.customer(), items), invalid("items")


@CASES.case("duplicate-product-in-order")
async def duplicate_product(env: Env) -> tuple[Call, Expect]:
    product_id = env.product()
    call = create_order(env.customer(), [(product_id, 1), (env.product(), 1), (product_id, 2)])
    return call, invalid("items[2].product_id")


@CASES.case("unknown-product-id")
async def unknown_product(env: Env) -> tuple[Call, Expect]:
    missing = str(uuid.uuid4())
    call = create_order(env.customer(), [(env.product(), 1), (missing, 1)])
    return call, not_found("product", missing)


@CASES.case("malformed-product-id")
async def malformed_product_id(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.customer(), [("not-a-uuid", 1)])
    return call, invalid("items[0].product_id")


@CASES.case("sql-injection-in-product-id")
async def injected_product_id(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.customer(), [(env.product(), 1), (SQL_INJECTION, 1)])
    return call, invalid("items[1].product_id")


@CASES.case("missing-request-id")
async def missing_request_id(env: Env) -> tuple[Call, Expect]:
    return create_order(env.customer(), [(env.product(), 1)], request_id=""), invalid("request_id")


@CASES.case("request-id-reused-with-other-lines")
async def request_id_reused(env: Env) -> tuple[Call, Expect]:
    token, product_id, request_id = env.customer(), env.product(), str(uuid.uuid4())
    await env.place_order(token, [(product_id, 1)], request_id=request_id)
    call = create_order(token, [(product_id, 2)], request_id=request_id)
    return call, precondition("REQUEST_ID_REUSED", requestId=request_id)


@CASES.case("out-of-stock")
async def out_of_stock(env: Env) -> tuple[Call, Expect]:
    plenty, scarce = env.product(stock=50), env.product(stock=3)
    call = create_order(env.customer(), [(plenty, 2), (scarce, 5)])
    return call, precondition("OUT_OF_STOCK", productId=scarce, requested="5", available="3")


@CASES.case("mixed-currencies")
async def mixed_currencies(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.customer(), [(env.product(), 1), (env.product(currency="EUR"), 1)])
    return call, precondition("MIXED_CURRENCIES")


# Whose order


@CASES.case("admin-creates-order")
async def admin_creates_order(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.tokens.admin(f"admin-{uuid.uuid4().hex[:8]}"), [(env.product(), 1)])
    return call, denied("customer")


@CASES.case("other-customers-order-get")
async def other_customers_order_get(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 1)])
    return get_order(env.customer(), order_id), not_found("order", order_id)


@CASES.case("other-customers-order-cancel")
async def other_customers_order_cancel(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 2)])
    return cancel_order(env.customer(), order_id), not_found("order", order_id)


@CASES.case("malformed-order-id")
async def malformed_order_id(env: Env) -> tuple[Call, Expect]:
    return get_order(env.customer(), SQL_INJECTION), invalid("id")


@CASES.case("cancel-with-malformed-request-id")
async def cancel_bad_request_id(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    return cancel_order(token, order_id, request_id="not valid!"), invalid("request_id")


# Listing


@CASES.case("page-token-of-another-listing")
async def products_token_for_orders(env: Env) -> tuple[Call, Expect]:
    env.product()
    env.product()
    page = await env.catalog.ListProducts(catalog_pb2.ListProductsRequest(page_size=1))
    assert page.next_page_token
    return list_orders(env.customer(), page_token=page.next_page_token), invalid("page_token")


@CASES.case("page-token-of-another-customer")
async def other_customers_page_token(env: Env) -> tuple[Call, Expect]:
    owner = env.customer()
    product_id = env.product()
    for _ in range(2):
        await env.place_order(owner, [(product_id, 1)])
    page = await env.orders.ListOrders(
        order_pb2.ListOrdersRequest(page_size=1), metadata=bearer(owner)
    )
    assert page.next_page_token
    return list_orders(env.customer(), page_token=page.next_page_token), invalid("page_token")


@CASES.case("orders-page-token-with-non-string-id")
async def orders_token_bad_position(env: Env) -> tuple[Call, Expect]:
    subject = f"bad-input-{uuid.uuid4().hex[:12]}"
    token = encode_page_token("orders", subject, {"t": "2024-01-01T00:00:00+00:00", "id": 123})
    return list_orders(env.tokens.customer(subject), page_token=token), invalid("page_token")


test_bad_input_is_refused_precisely_and_changes_nothing = CASES.test()


# --- details worth more than a code ---------------------------------------------------------


@pytest.mark.parametrize("transport", BOTH)
async def test_out_of_stock_names_every_short_line_and_keeps_stock(
    transport: str,
    stack: Stack,
    tokens: Tokens,
    channel: grpc.aio.Channel,
    rest: httpx.AsyncClient,
) -> None:
    env = Env.on(stack.database_url, tokens, channel)
    plenty, short_a, short_b = env.product(stock=50), env.product(stock=1), env.product(stock=0)
    call = create_order(env.customer(), [(plenty, 5), (short_a, 2), (short_b, 1)])

    if transport == GRPC:
        status = await refusal_over_grpc(channel, call)
    else:
        response = await over_rest(rest, call)
        assert response.status_code == 400, response.text
        status = status_of_json(response.json())

    assert code_name(status.code) == "FAILED_PRECONDITION"
    [failure] = details_of(status, error_details_pb2.PreconditionFailure)
    assert {(v.type, v.subject) for v in failure.violations} == {
        ("OUT_OF_STOCK", f"products/{short_a}"),
        ("OUT_OF_STOCK", f"products/{short_b}"),
    }
    assert [stock_of(stack.database_url, p) for p in (plenty, short_a, short_b)] == [50, 1, 0]
