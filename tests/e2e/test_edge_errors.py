"""The edge speaks JSON: every error a REST caller can receive, Envoy's own answers included,
is a google.rpc.Status in JSON with the HTTP status that fits it, and every response carries
the request's id."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from devstack.envoy import envoy_in_front_of
from devstack.processes import free_port
from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from server.api.errors import ERROR_DOMAIN
from tests.conftest import Tokens, insert_product, table_snapshot
from tests.e2e.edge import check_retry_later, parse_status
from tests.e2e.statuses import details_of, status_of_rpc_error
from tests.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SOME_ID = "00000000-0000-4000-8000-00000000abcd"


@dataclass(frozen=True)
class Bad:
    """A REST request and the Status it must get."""

    name: str
    method: str
    path: str
    status: int
    code: int
    # ErrorInfo reason (None: the Status need not carry one)
    reason: str | None = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # a customer's token, or an admin's
    authorized: bool = False
    admin: bool = False
    # the field a BadRequest violation and the ErrorInfo's metadata must name
    field: str | None = None


def _order(quantity: object = 1, **extra: object) -> bytes:
    body = {"requestId": "edge", "items": [{"productId": SOME_ID, "quantity": quantity}]}
    return json.dumps({**body, **extra}).encode()


def _json(**fields: object) -> bytes:
    return json.dumps(fields).encode()


MALFORMED = "MALFORMED_REQUEST"
WRONG_METHOD = "METHOD_NOT_ALLOWED"
UNKNOWN = "UNKNOWN_FIELD"
# Placeholders the test replaces with a fresh product, and an order of it the caller placed:
# a request that would succeed but for its unknown field (and would change the database).
PRODUCT, ORDER = "{product}", "{order}"
ITEM = {"productId": PRODUCT, "quantity": 1}
PRICE = {"currencyCode": "USD", "units": "5"}

CASES = [
    # JSON that does not parse, or is not the method's message
    Bad("truncated-json", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        b'{"requestId": "x", "items": ['),
    Bad("not-json", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED, b"hello"),
    Bad("json-array-root", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        b"[1, 2]"),
    Bad("trailing-garbage", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        b'{"requestId": "x"} x'),
    # wrong field types
    Bad("number-for-string", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        b'{"requestId": 5, "items": []}'),
    Bad("object-for-string", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        b'{"requestId": {}, "items": []}'),
    Bad("string-for-int32", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        _order("abc")),
    Bad("fraction-for-int32", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        _order(1.5)),
    Bad("string-for-repeated", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        b'{"requestId": "x", "items": "all"}'),
    # numbers out of their field's range
    Bad("int32-overflow", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        _order(2**31)),
    Bad("int32-underflow", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        _order(-(2**31) - 1)),
    Bad("int64-overflow-string", "POST", f"/v1/products/{SOME_ID}:adjustStock", 400,
        code_pb2.INVALID_ARGUMENT, MALFORMED, b'{"delta": "99999999999999999999"}'),
    Bad("int64-overflow-number", "POST", f"/v1/products/{SOME_ID}:adjustStock", 400,
        code_pb2.INVALID_ARGUMENT, MALFORMED, b'{"delta": 1e30}'),
    Bad("int32-overflow-in-query", "GET", "/v1/products?pageSize=99999999999", 400,
        code_pb2.INVALID_ARGUMENT, MALFORMED),
    Bad("text-for-int32-in-query", "GET", "/v1/products?pageSize=many", 400,
        code_pb2.INVALID_ARGUMENT, MALFORMED),
    # text that is not Unicode
    Bad("invalid-utf8", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        b'{"requestId": "\xff\xfe", "items": []}'),
    Bad("lone-high-surrogate", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        b'{"requestId": "\\ud800", "items": []}'),
    Bad("lone-low-surrogate", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        b'{"requestId": "\\udc00", "items": []}'),
    # nesting too deep (in a field the message does not even have)
    Bad("nesting-too-deep", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, MALFORMED,
        _order(1)[:-1] + b', "deep": ' + b"[" * 200 + b"]" * 200 + b"}"),
    # unknown query parameters and fields
    Bad("unknown-query-parameter", "GET", "/v1/products?sortBy=price", 400,
        code_pb2.INVALID_ARGUMENT, MALFORMED),
    Bad("unknown-field-in-query", "GET", "/v1/orders?order.bogus=1", 400,
        code_pb2.INVALID_ARGUMENT, MALFORMED),
    Bad("query-naming-a-path-field", "GET", f"/v1/products/{SOME_ID}?id=other", 400,
        code_pb2.INVALID_ARGUMENT, MALFORMED),
    # unknown routes, wrong methods
    Bad("unknown-route", "GET", "/v1/nowhere", 404, code_pb2.NOT_FOUND, "ROUTE_NOT_FOUND"),
    Bad("unknown-version", "GET", "/v2/products", 404, code_pb2.NOT_FOUND, "ROUTE_NOT_FOUND"),
    Bad("unknown-custom-method", "POST", f"/v1/orders/{SOME_ID}:refund", 404,
        code_pb2.NOT_FOUND, "ROUTE_NOT_FOUND", b"{}"),
    # / is the storefront; a page no route serves is a JSON 404 too
    Bad("unknown-page", "GET", "/nothing-here", 404, code_pb2.NOT_FOUND, "ROUTE_NOT_FOUND"),
    Bad("unknown-storefront-file", "GET", "/storefront/nothing.js", 404, code_pb2.NOT_FOUND,
        "ROUTE_NOT_FOUND"),
    Bad("delete-products", "DELETE", "/v1/products", 405, code_pb2.UNIMPLEMENTED, WRONG_METHOD),
    Bad("put-product", "PUT", f"/v1/products/{SOME_ID}", 405, code_pb2.UNIMPLEMENTED,
        WRONG_METHOD, b"{}"),
    Bad("post-order", "POST", f"/v1/orders/{SOME_ID}", 405, code_pb2.UNIMPLEMENTED,
        WRONG_METHOD, b"{}"),
    Bad("get-cancel", "GET", f"/v1/orders/{SOME_ID}:cancel", 405, code_pb2.UNIMPLEMENTED,
        WRONG_METHOD),
    Bad("get-webhook", "GET", "/v1/payments:webhook", 405, code_pb2.UNIMPLEMENTED, WRONG_METHOD),
    # too large
    Bad("headers-too-large", "GET", "/v1/products", 431, code_pb2.INVALID_ARGUMENT,
        "HEADERS_TOO_LARGE", headers={"x-padding": "a" * 70_000}),
    # fields a REST body's message does not define (the transcoder would drop them), named
    # as the REST caller writes them; a body that does not parse is still MALFORMED_REQUEST
    Bad("unknown-field", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, UNKNOWN,
        _json(requestId="edge-unknown", items=[ITEM], customerId="somebody-else"),
        authorized=True, field="customerId"),
    Bad("unknown-field-in-items", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, UNKNOWN,
        _json(requestId="edge-unknown", items=[{**ITEM, "quantityy": 5}]),
        authorized=True, field="items[0].quantityy"),
    Bad("unknown-field-in-product", "POST", "/v1/products", 400, code_pb2.INVALID_ARGUMENT,
        UNKNOWN, _json(sku="EDGE-UNKNOWN-1", name="n", price=PRICE, pricee=PRICE, stock=1),
        admin=True, field="product.pricee"),
    Bad("unknown-field-in-price", "POST", "/v1/products", 400, code_pb2.INVALID_ARGUMENT,
        UNKNOWN, _json(sku="EDGE-UNKNOWN-2", name="n", price={**PRICE, "currencyCod": "EUR"}),
        admin=True, field="product.price.currencyCod"),
    Bad("unknown-field-on-patch", "PATCH", f"/v1/products/{PRODUCT}?updateMask=name", 400,
        code_pb2.INVALID_ARGUMENT, UNKNOWN, _json(name="renamed", nmae="renamed"), admin=True,
        field="product.nmae"),
    Bad("unknown-field-on-adjust-stock", "POST", f"/v1/products/{PRODUCT}:adjustStock", 400,
        code_pb2.INVALID_ARGUMENT, UNKNOWN,
        _json(requestId="edge-unknown", delta=1, reason="r", deltaa=1000), admin=True,
        field="deltaa"),
    Bad("unknown-field-on-cancel", "POST", f"/v1/orders/{ORDER}:cancel", 400,
        code_pb2.INVALID_ARGUMENT, UNKNOWN, _json(requestId="edge-unknown", reason="no"),
        authorized=True, field="reason"),
    Bad("unknown-field-on-payment", "POST", f"/v1/orders/{ORDER}/payments", 400,
        code_pb2.INVALID_ARGUMENT, UNKNOWN,
        _json(requestId="edge-unknown", paymentMethod="pm_card_visa", amount=PRICE),
        authorized=True, field="amount"),
    Bad("unknown-field-on-refund", "POST", f"/v1/payments/{SOME_ID}:refund", 400,
        code_pb2.INVALID_ARGUMENT, UNKNOWN,
        _json(requestId="edge-unknown", reason="r", amount={**PRICE, "cents": 1}), admin=True,
        field="amount.cents"),
    Bad("unknown-field-escaped", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT, UNKNOWN,
        b'{"requestId": "edge-unknown", "items": [{"productId": "{product}", "quantity": 1}],'
        b' "st\\u0061tus": "PAID"}', authorized=True, field="st\\u0061tus"),
    Bad("unknown-field-in-malformed-json", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT,
        MALFORMED, _json(requestId="x", bogus=1) + b" x"),
    # refused by the server, transcoded by Envoy: fields named as the REST caller writes them
    Bad("server-invalid-argument", "GET", "/v1/products/not-a-uuid", 400,
        code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    Bad("server-not-found", "GET", f"/v1/products/{SOME_ID}", 404, code_pb2.NOT_FOUND,
        "NOT_FOUND"),
    Bad("server-unauthenticated", "GET", "/v1/orders", 401, code_pb2.UNAUTHENTICATED,
        "MISSING_TOKEN"),
    Bad("server-field-names", "POST", "/v1/orders", 400, code_pb2.INVALID_ARGUMENT,
        "INVALID_ARGUMENT", _order(0, requestId=""), authorized=True),
]  # fmt: skip


def check_edge_error(response: httpx.Response, bad: Bad) -> status_pb2.Status:
    answer = f"{response.status_code} {response.text[:600]}"
    assert response.status_code == bad.status, answer
    status = parse_status(response)
    assert code_pb2.Code.Name(status.code) == code_pb2.Code.Name(bad.code), answer
    if bad.reason is not None:
        [info] = details_of(status, error_details_pb2.ErrorInfo)
        assert (info.reason, info.domain) == (bad.reason, ERROR_DOMAIN), answer
    if bad.field is not None:
        assert info.metadata["field"] == bad.field, answer
        [bad_request] = details_of(status, error_details_pb2.BadRequest)
        assert [v.field for v in bad_request.field_violations] == [bad.field], answer
    assert UUID.fullmatch(response.headers.get("x-request-id", "")), response.headers
    return status


@pytest.mark.parametrize("bad", CASES, ids=[bad.name for bad in CASES])
async def test_every_error_is_a_json_status(
    bad: Bad, stack: Stack, rest: httpx.AsyncClient, tokens: Tokens
) -> None:
    """...and changes nothing, however valid the rest of the request."""
    headers = dict(bad.headers)
    if bad.authorized:
        headers["authorization"] = f"Bearer {tokens.customer(f'edge-{uuid.uuid4().hex[:8]}')}"
    if bad.admin:
        headers["authorization"] = f"Bearer {tokens.admin()}"
    path, content = await _arranged(bad, stack, rest, headers)
    before = table_snapshot(stack.database_url)

    response = await rest.request(bad.method, path, content=content, headers=headers)
    check_edge_error(response, bad)
    assert table_snapshot(stack.database_url) == before


async def _arranged(
    bad: Bad, stack: Stack, rest: httpx.AsyncClient, headers: Mapping[str, str]
) -> tuple[str, bytes | None]:
    """The request's path and body with a fresh product, or an order of one the caller
    placed, in place of its placeholders."""
    path, content = bad.path, bad.content
    if PRODUCT in path or (content and PRODUCT.encode() in content):
        product_id = insert_product(stack.database_url, stock=5)
        path = path.replace(PRODUCT, product_id)
        content = content and content.replace(PRODUCT.encode(), product_id.encode())
    if ORDER in path:
        item = {**ITEM, "productId": insert_product(stack.database_url, stock=5)}
        order = {"requestId": str(uuid.uuid4()), "items": [item]}
        placed = await rest.post("/v1/orders", json=order, headers=headers)
        assert placed.status_code == 200, placed.text
        path = path.replace(ORDER, placed.json()["order"]["id"])
    return path, content


async def test_known_fields_pass_by_json_and_proto_names(
    stack: Stack, rest: httpx.AsyncClient, tokens: Tokens
) -> None:
    """What protobuf's JSON parser takes passes the unknown-field check: lowerCamelCase and
    proto names, at any depth, and keys written with escapes."""
    customer = {"authorization": f"Bearer {tokens.customer(f'edge-{uuid.uuid4().hex[:8]}')}"}
    admin = {"authorization": f"Bearer {tokens.admin()}"}
    product_id = insert_product(stack.database_url, stock=5)
    for body in (
        _json(requestId=str(uuid.uuid4()), items=[{"productId": product_id, "quantity": 1}]),
        _json(request_id=str(uuid.uuid4()), items=[{"product_id": product_id, "quantity": 1}]),
        b'{"r\\u0065questId": "%s", "items": [{"productId": "%s", "quantity": 1}]}'
        % (uuid.uuid4().hex.encode(), product_id.encode()),
    ):
        placed = await rest.post("/v1/orders", content=body, headers=customer)
        assert placed.status_code == 200, placed.text
        assert placed.json()["order"]["items"][0]["quantity"] == 1

    sku = f"EDGE-KNOWN-{uuid.uuid4().hex[:8]}"
    product = {"sku": sku, "name": "n", "price": {"currency_code": "USD", "units": "5"}}
    created = await rest.post("/v1/products", json={**product, "stock": 1}, headers=admin)
    assert created.status_code == 200, created.text
    patched = await rest.patch(
        f"/v1/products/{created.json()['product']['id']}",
        params={"updateMask": "name"},
        json={"name": "renamed", "price": {"currencyCode": "USD", "units": "6", "nanos": 0}},
        headers=admin,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["product"]["name"] == "renamed"


def test_the_table_is_long_enough() -> None:
    assert len({bad.name for bad in CASES}) == len(CASES) >= 30


async def test_field_violations_name_fields_as_each_caller_wrote_them(
    stack: Stack, rest: httpx.AsyncClient, channel: grpc.aio.Channel, tokens: Tokens
) -> None:
    """REST callers read JSON names (requestId, items[0].productId); gRPC callers proto names."""
    token = tokens.customer(f"edge-{uuid.uuid4().hex[:8]}")
    response = await rest.post(
        "/v1/orders",
        json={"requestId": "", "items": [{"productId": "nope", "quantity": 1}]},
        headers={"authorization": f"Bearer {token}"},
    )
    [over_rest] = details_of(parse_status(response), error_details_pb2.BadRequest)
    assert {v.field for v in over_rest.field_violations} == {"requestId", "items[0].productId"}

    catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await catalog.ListProducts(catalog_pb2.ListProductsRequest(page_token="junk"))
    [over_grpc] = details_of(status_of_rpc_error(refused.value), error_details_pb2.BadRequest)
    assert [v.field for v in over_grpc.field_violations] == ["page_token"]
    response = await rest.get("/v1/products", params={"pageToken": "junk"})
    [over_rest] = details_of(parse_status(response), error_details_pb2.BadRequest)
    assert [v.field for v in over_rest.field_violations] == ["pageToken"]


def _rest_paths() -> dict[str, set[str]]:
    """Every path of the protos' google.api.http rules, its variables filled in, and the
    methods it serves."""
    image = (ROOT / "generated" / "marketplace.binpb").read_bytes()
    paths: dict[str, set[str]] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(image).file:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                if verb is None or verb == "custom":
                    continue
                path = re.sub(r"\{[^}]+\}", SOME_ID, getattr(rule, verb))
                paths.setdefault(path, set()).add(verb.upper())
    return paths


@pytest.mark.parametrize(("path", "allowed"), sorted(_rest_paths().items()))
async def test_a_known_path_asked_with_another_method_is_405(
    path: str, allowed: set[str], rest: httpx.AsyncClient
) -> None:
    for method in {"GET", "POST", "PATCH", "PUT", "DELETE"} - allowed:
        response = await rest.request(method, path, content=b"{}" if method != "GET" else None)
        bad = Bad(f"{method} {path}", method, path, 405, code_pb2.UNIMPLEMENTED, WRONG_METHOD)
        check_edge_error(response, bad)
        assert set(response.headers["allow"].split(", ")) == allowed


async def test_every_response_carries_the_request_id_the_server_used(
    stack: Stack, rest: httpx.AsyncClient
) -> None:
    """Envoy makes the id (a caller's own is replaced), the server logs it and trails it,
    and Envoy returns it on successes too."""
    product_id = insert_product(stack.database_url, stock=1)
    response = await rest.get(f"/v1/products/{product_id}", headers={"x-request-id": "mine"})
    assert response.status_code == 200, response.text
    assert UUID.fullmatch(response.headers["x-request-id"]), response.headers

    # A gRPC call through Envoy shows both: Envoy's header and the server's trailer.
    async with grpc.aio.insecure_channel(stack.rest_base.removeprefix("http://")) as channel:
        call = catalog_pb2_grpc.CatalogServiceStub(channel).GetProduct(
            catalog_pb2.GetProductRequest(id=product_id)
        )
        await call
        envoys = dict(await call.initial_metadata())["x-request-id"]
        servers = dict(await call.trailing_metadata())["x-request-id"]
    assert UUID.fullmatch(str(envoys))
    assert envoys == servers


async def test_an_unreachable_server_is_a_json_503_with_retry_after(
    tmp_path: Path, tokens: Tokens
) -> None:
    nobody = free_port()
    with envoy_in_front_of(nobody, tmp_path) as envoy:
        base = f"http://127.0.0.1:{envoy.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as rest:
            for method, path in (("GET", "/v1/products"), ("POST", "/v1/orders")):
                response = await rest.request(method, path, content=b"{}")
                check_retry_later(response, 503, code_pb2.UNAVAILABLE, "SERVICE_UNAVAILABLE")
                assert UUID.fullmatch(response.headers["x-request-id"])
