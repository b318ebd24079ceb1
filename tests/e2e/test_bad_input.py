"""Bad input through both doors: every refusal is the specific status with its rich details,
the same through gRPC and through REST via Envoy, never INTERNAL/500, and the database is
exactly as it was before the request.

Each case arranges its own data (fresh products and token subjects: the database is shared
by the whole session) and returns the call to make plus what the refusal must look like.
The call is described once, as the gRPC method and request; its REST twin is derived from
the method's google.api.http rule, or given explicitly where the point is REST itself
(malformed JSON, an int64 where the proto says int32, unknown JSON fields and routes).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import jwt
import psycopg
import pytest
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from google.type import money_pb2

from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from marketplace.payment.v1 import payment_pb2
from server.api.auth import issue_development_token
from server.domain.pagination import encode_page_token
from tests.conftest import Tokens, insert_product, stock_of, table_snapshot
from tests.e2e.conftest import Stack, bearer
from tests.e2e.statuses import (
    HTTP_STATUS_OF,
    code_name,
    detail_of,
    details_of,
    status_of_json,
    status_of_rpc_error,
)

pytestmark = pytest.mark.e2e

CATALOG = "/marketplace.catalog.v1.CatalogService"
ORDERS = "/marketplace.order.v1.OrderService"
PAYMENTS = "/marketplace.payment.v1.PaymentService"
SQL_INJECTION = "'; DROP TABLE orders; --"
GRPC = "grpc"
REST = "rest"
BOTH = (GRPC, REST)


# --- what to send ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Http:
    method: str
    path: str
    json: Any = None
    content: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    """One request, as a gRPC call (`rpc` + `request`) and as its REST twin (`http`)."""

    rpc: str
    request: Message | bytes
    http: Http
    authorization: str | None = None


def _auth(token: str | None) -> str | None:
    return None if token is None else f"Bearer {token}"


def _path(value: str) -> str:
    return quote(value, safe="")


def _body(message: Message, *drop: str) -> dict[str, Any]:
    body = json_format.MessageToDict(message)
    for name in drop:
        body.pop(name, None)
    return body


def create_order(
    token: str | None,
    items: list[tuple[str, int]],
    *,
    request_id: str | None = None,
    authorization: str | None = None,
) -> Call:
    request = order_pb2.CreateOrderRequest(
        request_id=str(uuid.uuid4()) if request_id is None else request_id,
        items=[order_pb2.OrderItem(product_id=p, quantity=q) for p, q in items],
    )
    return Call(
        f"{ORDERS}/CreateOrder",
        request,
        Http("POST", "/v1/orders", json=_body(request)),
        authorization or _auth(token),
    )


def get_order(token: str | None, order_id: str) -> Call:
    request = order_pb2.GetOrderRequest(id=order_id)
    return Call(
        f"{ORDERS}/GetOrder", request, Http("GET", f"/v1/orders/{_path(order_id)}"), _auth(token)
    )


def cancel_order(token: str | None, order_id: str, request_id: str = "") -> Call:
    request = order_pb2.CancelOrderRequest(id=order_id, request_id=request_id)
    http = Http("POST", f"/v1/orders/{_path(order_id)}:cancel", json=_body(request, "id"))
    return Call(f"{ORDERS}/CancelOrder", request, http, _auth(token))


def _page_params(page_size: int, page_token: str) -> dict[str, str]:
    params = {}
    if page_size:
        params["pageSize"] = str(page_size)
    if page_token:
        params["pageToken"] = page_token
    return params


def list_orders(token: str | None, *, page_size: int = 0, page_token: str = "") -> Call:
    request = order_pb2.ListOrdersRequest(page_size=page_size, page_token=page_token)
    http = Http("GET", "/v1/orders", params=_page_params(page_size, page_token))
    return Call(f"{ORDERS}/ListOrders", request, http, _auth(token))


def list_products(*, page_size: int = 0, page_token: str = "") -> Call:
    request = catalog_pb2.ListProductsRequest(page_size=page_size, page_token=page_token)
    http = Http("GET", "/v1/products", params=_page_params(page_size, page_token))
    return Call(f"{CATALOG}/ListProducts", request, http)


def get_product(product_id: str) -> Call:
    request = catalog_pb2.GetProductRequest(id=product_id)
    return Call(f"{CATALOG}/GetProduct", request, Http("GET", f"/v1/products/{_path(product_id)}"))


def new_product(**overrides: Any) -> catalog_pb2.Product:
    fields: dict[str, Any] = {
        "sku": f"BAD-{uuid.uuid4().hex[:12]}",
        "name": "A perfectly good product",
        "description": "",
        "price": money_pb2.Money(currency_code="USD", units=10, nanos=500_000_000),
        "stock": 5,
    }
    fields.update(overrides)
    return catalog_pb2.Product(**{k: v for k, v in fields.items() if v is not None})


def create_product(token: str | None, product: catalog_pb2.Product) -> Call:
    request = catalog_pb2.CreateProductRequest(product=product)
    http = Http("POST", "/v1/products", json=_body(product))
    return Call(f"{CATALOG}/CreateProduct", request, http, _auth(token))


def update_product(token: str | None, product: catalog_pb2.Product, mask: list[str]) -> Call:
    request = catalog_pb2.UpdateProductRequest(
        product=product, update_mask=field_mask_pb2.FieldMask(paths=mask)
    )
    http = Http(
        "PATCH",
        f"/v1/products/{_path(product.id)}",
        json=_body(product, "id"),
        params={"updateMask": ",".join(mask)} if mask else {},
    )
    return Call(f"{CATALOG}/UpdateProduct", request, http, _auth(token))


def adjust_stock(
    token: str | None, product_id: str, delta: int, request_id: str | None = None
) -> Call:
    request = catalog_pb2.AdjustStockRequest(
        id=product_id,
        delta=delta,
        reason="bad-input test",
        request_id=str(uuid.uuid4()) if request_id is None else request_id,
    )
    http = Http("POST", f"/v1/products/{_path(product_id)}:adjustStock", json=_body(request, "id"))
    return Call(f"{CATALOG}/AdjustStock", request, http, _auth(token))


# --- what must come back --------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    code: int
    # BadRequest field violations, exactly (None: not checked)
    fields: frozenset[str] | None = None
    # ErrorInfo reason and a subset of its metadata
    reason: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    # ResourceInfo of a NOT_FOUND / ALREADY_EXISTS
    resource: tuple[str, str] | None = None
    # When Envoy itself refuses the REST request (transcoding failed, so no google.rpc.Status
    # body): the HTTP status and a text its plain-text answer must contain.
    envoy_status: int | None = None
    envoy_text: str | None = None

    @property
    def http_status(self) -> int:
        return self.envoy_status or HTTP_STATUS_OF[self.code]


def invalid(*fields: str) -> Expect:
    return Expect(code_pb2.INVALID_ARGUMENT, fields=frozenset(fields))


def precondition(reason: str, **metadata: str) -> Expect:
    return Expect(code_pb2.FAILED_PRECONDITION, reason=reason, metadata=metadata)


def unauthenticated(reason: str) -> Expect:
    return Expect(code_pb2.UNAUTHENTICATED, reason=reason)


def denied(required_role: str) -> Expect:
    return Expect(
        code_pb2.PERMISSION_DENIED, reason="MISSING_ROLE", metadata={"requiredRole": required_role}
    )


def not_found(resource_type: str, name: str) -> Expect:
    return Expect(code_pb2.NOT_FOUND, resource=(resource_type, name))


def already_exists(key: str) -> Expect:
    return Expect(
        code_pb2.ALREADY_EXISTS,
        reason="ALREADY_EXISTS",
        metadata={"key": key},
        resource=("product", key),
    )


def check_status(status: status_pb2.Status, expect: Expect) -> None:
    assert status.code not in (code_pb2.INTERNAL, code_pb2.UNKNOWN), status.message
    assert code_name(status.code) == code_name(expect.code), status.message
    assert status.message
    if expect.fields is not None:
        bad_request = detail_of(status, error_details_pb2.BadRequest)
        named = {violation.field for violation in bad_request.field_violations}
        assert named == expect.fields, status.message
        assert all(v.description for v in bad_request.field_violations)
    if expect.reason is not None:
        info = detail_of(status, error_details_pb2.ErrorInfo)
        assert info.reason == expect.reason
        assert info.domain == "marketplace"
        assert dict(info.metadata).items() >= dict(expect.metadata).items(), info.metadata
    if expect.resource is not None:
        resource = detail_of(status, error_details_pb2.ResourceInfo)
        assert (resource.resource_type, resource.resource_name) == expect.resource


# --- the cases ------------------------------------------------------------------------------


@dataclass
class Env:
    """What a case may use to arrange its data (never the thing under test)."""

    database_url: str
    tokens: Tokens
    catalog: catalog_pb2_grpc.CatalogServiceStub
    orders: order_pb2_grpc.OrderServiceStub

    def product(self, *, stock: int = 10, currency: str = "USD", sku: str | None = None) -> str:
        return insert_product(self.database_url, stock=stock, currency=currency, sku=sku)

    def customer(self) -> str:
        """A token for a customer nobody else uses."""
        return self.tokens.customer(f"bad-input-{uuid.uuid4().hex[:12]}")

    async def place_order(self, token: str, items: list[tuple[str, int]], **kw: Any) -> str:
        request = create_order(token, items, **kw).request
        assert isinstance(request, order_pb2.CreateOrderRequest)
        response = await self.orders.CreateOrder(request, metadata=bearer(token))
        order_id: str = response.order.id
        return order_id


Arrange = Callable[[Env], Awaitable[tuple[Call, Expect]]]


@pytest.fixture
def env(
    stack: Stack,
    tokens: Tokens,
    catalog_stub: catalog_pb2_grpc.CatalogServiceStub,
    order_stub: order_pb2_grpc.OrderServiceStub,
) -> Env:
    return Env(stack.database_url, tokens, catalog_stub, order_stub)


@dataclass(frozen=True)
class Case:
    name: str
    arrange: Arrange
    transports: tuple[str, ...]


CASES: list[Case] = []


def case(name: str, *, transports: tuple[str, ...] = BOTH) -> Callable[[Arrange], Arrange]:
    def register(arrange: Arrange) -> Arrange:
        CASES.append(Case(name, arrange, transports))
        return arrange

    return register


# CreateOrder: quantities


@case("quantity-zero")
async def quantity_zero(env: Env) -> tuple[Call, Expect]:
    return create_order(env.customer(), [(env.product(), 0)]), invalid("items[0].quantity")


@case("quantity-negative")
async def quantity_negative(env: Env) -> tuple[Call, Expect]:
    return create_order(env.customer(), [(env.product(), -1)]), invalid("items[0].quantity")


@case("quantity-1001")
async def quantity_over_limit(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.customer(), [(env.product(stock=5000), 1001)])
    return call, invalid("items[0].quantity")


@case("quantity-int32-max")
async def quantity_int32_max(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.customer(), [(env.product(), 2**31 - 1)])
    return call, invalid("items[0].quantity")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@case("quantity-2pow40")
async def quantity_beyond_int32(env: Env) -> tuple[Call, Expect]:
    """REST: JSON can carry 2**40 for an int32 field, and Envoy must refuse it (400) rather
    than pass on a truncated number. gRPC: the same varint on the wire; protobuf parses an
    int32 by truncation (2**40 -> 0), which the server must still refuse."""
    product_id = env.product()
    token = env.customer()
    request_id = str(uuid.uuid4())
    item = _length_delimited(1, product_id.encode()) + _varint(2 << 3 | 0) + _varint(2**40)
    wire = _length_delimited(1, request_id.encode()) + _length_delimited(2, item)
    body = {"requestId": request_id, "items": [{"productId": product_id, "quantity": 2**40}]}
    call = Call(f"{ORDERS}/CreateOrder", wire, Http("POST", "/v1/orders", json=body), _auth(token))
    expect = invalid("items[0].quantity")
    return call, Expect(
        expect.code, fields=expect.fields, envoy_status=400, envoy_text="items[0].quantity"
    )


# CreateOrder: lines


@case("no-items")
async def no_items(env: Env) -> tuple[Call, Expect]:
    return create_order(env.customer(), []), invalid("items")


@case("101-items")
async def too_many_items(env: Env) -> tuple[Call, Expect]:
    items = [(str(uuid.uuid4()), 1) for _ in range(101)]
    return create_order(env.customer(), items), invalid("items")


@case("duplicate-product-in-order")
async def duplicate_product(env: Env) -> tuple[Call, Expect]:
    product_id = env.product()
    call = create_order(env.customer(), [(product_id, 1), (env.product(), 1), (product_id, 2)])
    return call, invalid("items[2].product_id")


@case("unknown-product-id")
async def unknown_product(env: Env) -> tuple[Call, Expect]:
    missing = str(uuid.uuid4())
    call = create_order(env.customer(), [(env.product(), 1), (missing, 1)])
    return call, not_found("product", missing)


@case("malformed-product-id")
async def malformed_product_id(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.customer(), [("not-a-uuid", 1)])
    return call, invalid("items[0].product_id")


@case("sql-injection-in-product-id")
async def injected_product_id(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.customer(), [(env.product(), 1), (SQL_INJECTION, 1)])
    return call, invalid("items[1].product_id")


@case("missing-request-id")
async def missing_request_id(env: Env) -> tuple[Call, Expect]:
    return create_order(env.customer(), [(env.product(), 1)], request_id=""), invalid("request_id")


@case("request-id-reused-with-other-lines")
async def request_id_reused(env: Env) -> tuple[Call, Expect]:
    token, product_id, request_id = env.customer(), env.product(), str(uuid.uuid4())
    await env.place_order(token, [(product_id, 1)], request_id=request_id)
    call = create_order(token, [(product_id, 2)], request_id=request_id)
    return call, precondition("REQUEST_ID_REUSED", requestId=request_id)


@case("out-of-stock")
async def out_of_stock(env: Env) -> tuple[Call, Expect]:
    plenty, scarce = env.product(stock=50), env.product(stock=3)
    call = create_order(env.customer(), [(plenty, 2), (scarce, 5)])
    return call, precondition("OUT_OF_STOCK", productId=scarce, requested="5", available="3")


@case("mixed-currencies")
async def mixed_currencies(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.customer(), [(env.product(), 1), (env.product(currency="EUR"), 1)])
    return call, precondition("MIXED_CURRENCIES")


# Authentication and authorization


@case("no-token")
async def no_token(env: Env) -> tuple[Call, Expect]:
    return create_order(None, [(env.product(), 1)]), unauthenticated("MISSING_TOKEN")


@case("expired-token")
async def expired_token(env: Env) -> tuple[Call, Expect]:
    call = create_order(
        env.tokens.expired(f"bad-input-{uuid.uuid4().hex[:8]}"), [(env.product(), 1)]
    )
    return call, unauthenticated("TOKEN_EXPIRED")


@case("wrong-signature")
async def wrong_signature(env: Env) -> tuple[Call, Expect]:
    token = env.tokens.wrong_signature(f"bad-input-{uuid.uuid4().hex[:8]}")
    return create_order(token, [(env.product(), 1)]), unauthenticated("INVALID_TOKEN")


@case("basic-authorization-header")
async def basic_authorization(env: Env) -> tuple[Call, Expect]:
    call = create_order(None, [(env.product(), 1)], authorization="Basic abc")
    return call, unauthenticated("MISSING_TOKEN")


@case("customer-creates-product")
async def customer_creates_product(env: Env) -> tuple[Call, Expect]:
    return create_product(env.customer(), new_product()), denied("admin")


@case("customer-adjusts-stock")
async def customer_adjusts_stock(env: Env) -> tuple[Call, Expect]:
    return adjust_stock(env.customer(), env.product(), 5), denied("admin")


@case("admin-creates-order")
async def admin_creates_order(env: Env) -> tuple[Call, Expect]:
    call = create_order(env.tokens.admin(f"admin-{uuid.uuid4().hex[:8]}"), [(env.product(), 1)])
    return call, denied("customer")


@case("roleless-token-lists-orders")
async def roleless_token(env: Env) -> tuple[Call, Expect]:
    token = issue_development_token(
        env.tokens.secret, f"guest-{uuid.uuid4().hex[:8]}", ["guest"], lifetime_seconds=600
    )
    return list_orders(token), denied("customer")


@case("other-customers-order-get")
async def other_customers_order_get(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 1)])
    return get_order(env.customer(), order_id), not_found("order", order_id)


@case("other-customers-order-cancel")
async def other_customers_order_cancel(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 2)])
    return cancel_order(env.customer(), order_id), not_found("order", order_id)


@case("malformed-order-id")
async def malformed_order_id(env: Env) -> tuple[Call, Expect]:
    return get_order(env.customer(), SQL_INJECTION), invalid("id")


@case("cancel-with-malformed-request-id")
async def cancel_bad_request_id(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    return cancel_order(token, order_id, request_id="not valid!"), invalid("request_id")


# Listing


@case("garbage-page-token")
async def garbage_page_token(env: Env) -> tuple[Call, Expect]:
    return list_products(page_token="%%% not a token %%%"), invalid("page_token")


@case("negative-page-size")
async def negative_page_size(env: Env) -> tuple[Call, Expect]:
    return list_products(page_size=-1), invalid("page_size")


@case("page-token-of-another-listing")
async def products_token_for_orders(env: Env) -> tuple[Call, Expect]:
    env.product()
    env.product()
    page = await env.catalog.ListProducts(catalog_pb2.ListProductsRequest(page_size=1))
    assert page.next_page_token
    return list_orders(env.customer(), page_token=page.next_page_token), invalid("page_token")


@case("page-token-of-another-customer")
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


@case("orders-page-token-with-non-string-id")
async def orders_token_bad_position(env: Env) -> tuple[Call, Expect]:
    subject = f"bad-input-{uuid.uuid4().hex[:12]}"
    token = encode_page_token("orders", subject, {"t": "2024-01-01T00:00:00+00:00", "id": 123})
    return list_orders(env.tokens.customer(subject), page_token=token), invalid("page_token")


@case("products-page-token-with-nul")
async def products_token_with_nul(env: Env) -> tuple[Call, Expect]:
    token = encode_page_token("products", "*", {"sku": "\x00"})
    return list_products(page_token=token), invalid("page_token")


# Catalog writes


@case("sql-injection-in-sku-and-name")
async def injected_sku_and_name(env: Env) -> tuple[Call, Expect]:
    """The name may hold any text (it is only ever a bound parameter); the SKU may not."""
    product = new_product(sku=SQL_INJECTION, name=SQL_INJECTION)
    return create_product(env.tokens.admin(), product), invalid("product.sku")


@case("name-201-chars")
async def overlong_name(env: Env) -> tuple[Call, Expect]:
    return create_product(env.tokens.admin(), new_product(name="n" * 201)), invalid("product.name")


@case("description-5001-chars")
async def overlong_description(env: Env) -> tuple[Call, Expect]:
    product = new_product(description="d" * 5001)
    return create_product(env.tokens.admin(), product), invalid("product.description")


def _priced(currency: str, units: int, nanos: int = 0) -> catalog_pb2.Product:
    return new_product(price=money_pb2.Money(currency_code=currency, units=units, nanos=nanos))


@case("currency-XYZ")
async def unknown_currency(env: Env) -> tuple[Call, Expect]:
    return create_product(env.tokens.admin(), _priced("XYZ", 5)), invalid("product.price")


@case("currency-lowercase-usd")
async def lowercase_currency(env: Env) -> tuple[Call, Expect]:
    return create_product(env.tokens.admin(), _priced("usd", 5)), invalid("product.price")


@case("negative-price")
async def negative_price(env: Env) -> tuple[Call, Expect]:
    return create_product(env.tokens.admin(), _priced("USD", -1)), invalid("product.price")


@case("nanos-out-of-range")
async def nanos_out_of_range(env: Env) -> tuple[Call, Expect]:
    product = _priced("USD", 1, 1_000_000_000)
    return create_product(env.tokens.admin(), product), invalid("product.price")


@case("missing-price")
async def missing_price(env: Env) -> tuple[Call, Expect]:
    product = new_product(price=None)
    return create_product(env.tokens.admin(), product), invalid("product.price")


@case("duplicate-sku")
async def duplicate_sku(env: Env) -> tuple[Call, Expect]:
    sku = f"DUP-{uuid.uuid4().hex[:12]}"
    env.product(sku=sku)
    return create_product(env.tokens.admin(), new_product(sku=sku)), already_exists(sku)


@case("update-mask-stock")
async def update_mask_stock(env: Env) -> tuple[Call, Expect]:
    product = catalog_pb2.Product(id=env.product(stock=5), stock=500)
    return update_product(env.tokens.admin(), product, ["stock"]), invalid("update_mask")


@case("update-to-taken-sku")
async def update_to_taken_sku(env: Env) -> tuple[Call, Expect]:
    taken = f"TAKEN-{uuid.uuid4().hex[:12]}"
    env.product(sku=taken)
    product = catalog_pb2.Product(id=env.product(), sku=taken)
    return update_product(env.tokens.admin(), product, ["sku"]), already_exists(taken)


@case("update-unknown-product")
async def update_unknown_product(env: Env) -> tuple[Call, Expect]:
    missing = str(uuid.uuid4())
    product = catalog_pb2.Product(id=missing, name="Renamed")
    return update_product(env.tokens.admin(), product, ["name"]), not_found("product", missing)


@case("get-product-sql-injection-id")
async def get_injected_product(env: Env) -> tuple[Call, Expect]:
    return get_product(SQL_INJECTION), invalid("id")


@case("get-unknown-product")
async def get_unknown_product(env: Env) -> tuple[Call, Expect]:
    missing = str(uuid.uuid4())
    return get_product(missing), not_found("product", missing)


@case("adjust-stock-below-zero")
async def adjust_below_zero(env: Env) -> tuple[Call, Expect]:
    product_id = env.product(stock=2)
    call = adjust_stock(env.tokens.admin(), product_id, -3)
    return call, precondition(
        "INSUFFICIENT_STOCK", productId=product_id, requested="3", available="2"
    )


@case("adjust-stock-delta-zero")
async def adjust_by_zero(env: Env) -> tuple[Call, Expect]:
    return adjust_stock(env.tokens.admin(), env.product(), 0), invalid("delta")


@case("adjust-stock-unknown-product")
async def adjust_unknown_product(env: Env) -> tuple[Call, Expect]:
    missing = str(uuid.uuid4())
    return adjust_stock(env.tokens.admin(), missing, 1), not_found("product", missing)


@case("adjust-stock-request-id-reused")
async def adjust_request_id_reused(env: Env) -> tuple[Call, Expect]:
    admin, product_id, request_id = env.tokens.admin(), env.product(), str(uuid.uuid4())
    first = adjust_stock(admin, product_id, 1, request_id).request
    assert isinstance(first, catalog_pb2.AdjustStockRequest)
    await env.catalog.AdjustStock(first, metadata=bearer(admin))
    call = adjust_stock(admin, product_id, 2, request_id)
    return call, precondition("REQUEST_ID_REUSED", requestId=request_id)


# The transports themselves


@case("malformed-body")
async def malformed_body(env: Env) -> tuple[Call, Expect]:
    """REST: JSON that does not parse. gRPC: a message that does not parse (a truncated
    length-delimited field). Both are the caller's fault: INVALID_ARGUMENT, never
    INTERNAL/UNKNOWN."""
    corrupt = _varint(1 << 3 | 2) + _varint(200) + b"short"
    http = Http("POST", "/v1/orders", content='{"requestId": "x", "items": [')
    call = Call(f"{ORDERS}/CreateOrder", corrupt, http, _auth(env.customer()))
    return call, Expect(code_pb2.INVALID_ARGUMENT, envoy_status=400, envoy_text="")


@case("unknown-query-parameter", transports=(REST,))
async def unknown_query_parameter(env: Env) -> tuple[Call, Expect]:
    call = list_products(page_size=1)
    http = Http("GET", "/v1/products", params={"pageSize": "1", "sortBy": "price"})
    return (
        Call(call.rpc, call.request, http),
        Expect(code_pb2.INVALID_ARGUMENT, envoy_status=400, envoy_text="sortBy"),
    )


@case("unknown-route")
async def unknown_route(env: Env) -> tuple[Call, Expect]:
    order_id = str(uuid.uuid4())
    http = Http("POST", f"/v1/orders/{order_id}:refund", json={})
    call = Call(f"{ORDERS}/RefundOrder", b"", http, _auth(env.customer()))
    return call, Expect(code_pb2.UNIMPLEMENTED, envoy_status=404, envoy_text="Could not resolve")


# PaymentService


def create_payment(
    token: str | None, order_id: str, payment_method: str, request_id: str | None = None
) -> Call:
    request = payment_pb2.CreatePaymentRequest(
        order_id=order_id,
        request_id=str(uuid.uuid4()) if request_id is None else request_id,
        payment_method=payment_method,
    )
    http = Http("POST", f"/v1/orders/{_path(order_id)}/payments", json=_body(request, "orderId"))
    return Call(f"{PAYMENTS}/CreatePayment", request, http, _auth(token))


def refund_payment(
    token: str | None, payment_id: str, amount: money_pb2.Money | None = None
) -> Call:
    request = payment_pb2.RefundPaymentRequest(
        id=payment_id, request_id=str(uuid.uuid4()), reason="bad-input test"
    )
    if amount is not None:
        request.amount.CopyFrom(amount)
    http = Http("POST", f"/v1/payments/{_path(payment_id)}:refund", json=_body(request, "id"))
    return Call(f"{PAYMENTS}/RefundPayment", request, http, _auth(token))


def get_payment(token: str | None, payment_id: str) -> Call:
    request = payment_pb2.GetPaymentRequest(id=payment_id)
    http = Http("GET", f"/v1/payments/{_path(payment_id)}")
    return Call(f"{PAYMENTS}/GetPayment", request, http, _auth(token))


def list_payments(token: str | None, order_id: str, page_token: str = "") -> Call:
    request = payment_pb2.ListPaymentsRequest(order_id=order_id, page_token=page_token)
    http = Http("GET", f"/v1/orders/{_path(order_id)}/payments", params=_page_params(0, page_token))
    return Call(f"{PAYMENTS}/ListPayments", request, http, _auth(token))


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


@case("payment-with-a-card-number")
async def payment_with_card_number(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    return create_payment(token, order_id, "4242424242424242"), invalid("payment_method")


@case("payment-every-field-wrong")
async def payment_every_field_wrong(env: Env) -> tuple[Call, Expect]:
    call = create_payment(env.customer(), "not-a-uuid", "pm_ok; DROP TABLE payments", "")
    return call, invalid("order_id", "request_id", "payment_method")


@case("payment-unknown-order")
async def payment_unknown_order(env: Env) -> tuple[Call, Expect]:
    order_id = str(uuid.uuid4())
    return create_payment(env.customer(), order_id, "pm_card_visa"), not_found("order", order_id)


@case("payment-of-another-customers-order")
async def payment_other_customer(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 1)])
    return create_payment(env.customer(), order_id, "pm_card_visa"), not_found("order", order_id)


@case("payment-without-token")
async def payment_without_token(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 1)])
    return create_payment(None, order_id, "pm_card_visa"), unauthenticated("MISSING_TOKEN")


@case("payment-by-an-admin-without-customer-role")
async def payment_by_admin(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 1)])
    return create_payment(env.tokens.admin(), order_id, "pm_card_visa"), denied("customer")


@case("payment-of-a-cancelled-order")
async def payment_cancelled_order(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    await env.orders.CancelOrder(order_pb2.CancelOrderRequest(id=order_id), metadata=bearer(token))
    call = create_payment(token, order_id, "pm_card_visa")
    return call, precondition("ORDER_NOT_PAYABLE", orderId=order_id, status="CANCELLED")


@case("payment-of-a-paid-order")
async def payment_paid_order(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    seed_payment(env, order_id, _subject(token), "SUCCEEDED")
    with psycopg.connect(env.database_url) as conn:
        conn.execute("UPDATE orders SET status = 'PAID' WHERE id = %s", (order_id,))
    call = create_payment(token, order_id, "pm_card_visa")
    return call, precondition("ORDER_NOT_PAYABLE", status="PAID")


@case("refund-by-a-customer")
async def refund_by_customer(env: Env) -> tuple[Call, Expect]:
    return refund_payment(env.customer(), str(uuid.uuid4())), denied("admin")


@case("refund-unknown-payment")
async def refund_unknown_payment(env: Env) -> tuple[Call, Expect]:
    payment_id = str(uuid.uuid4())
    return refund_payment(env.tokens.admin(), payment_id), not_found("payment", payment_id)


@case("refund-negative-amount")
async def refund_negative_amount(env: Env) -> tuple[Call, Expect]:
    amount = money_pb2.Money(currency_code="USD", units=-5)
    return refund_payment(env.tokens.admin(), str(uuid.uuid4()), amount), invalid("amount")


@case("refund-not-a-currency")
async def refund_not_a_currency(env: Env) -> tuple[Call, Expect]:
    amount = money_pb2.Money(currency_code="XXQ", units=5)
    return refund_payment(env.tokens.admin(), str(uuid.uuid4()), amount), invalid("amount")


@case("refund-of-a-failed-payment")
async def refund_failed_payment(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    payment_id = seed_payment(env, order_id, _subject(token), "FAILED")
    call = refund_payment(env.tokens.admin(), payment_id)
    return call, precondition("PAYMENT_NOT_REFUNDABLE", paymentId=payment_id, status="FAILED")


@case("refund-more-than-paid")
async def refund_more_than_paid(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])  # 10.00 USD
    payment_id = seed_payment(env, order_id, _subject(token), "SUCCEEDED")
    amount = money_pb2.Money(currency_code="USD", units=10, nanos=10_000_000)
    call = refund_payment(env.tokens.admin(), payment_id, amount)
    return call, precondition("REFUND_EXCEEDS_PAYMENT", paymentId=payment_id)


@case("get-payment-malformed-id")
async def get_payment_malformed(env: Env) -> tuple[Call, Expect]:
    return get_payment(env.customer(), SQL_INJECTION), invalid("id")


@case("get-another-customers-payment")
async def get_payment_of_other(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    payment_id = seed_payment(env, order_id, _subject(token), "FAILED")
    return get_payment(env.customer(), payment_id), not_found("payment", payment_id)


@case("list-payments-of-another-customers-order")
async def list_payments_of_other(env: Env) -> tuple[Call, Expect]:
    order_id = await env.place_order(env.customer(), [(env.product(), 1)])
    return list_payments(env.customer(), order_id), not_found("order", order_id)


@case("list-payments-foreign-page-token")
async def list_payments_foreign_token(env: Env) -> tuple[Call, Expect]:
    token = env.customer()
    order_id = await env.place_order(token, [(env.product(), 1)])
    foreign = encode_page_token("payments", str(uuid.uuid4()), {"t": "x", "id": "y"})
    return list_payments(token, order_id, foreign), invalid("page_token")


@case("webhook-without-signature")
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


# --- running them ---------------------------------------------------------------------------


async def refusal_over_grpc(channel: grpc.aio.Channel, call: Call) -> status_pb2.Status:
    serialize = None if isinstance(call.request, bytes) else type(call.request).SerializeToString
    method = channel.unary_unary(call.rpc, request_serializer=serialize)
    metadata = () if call.authorization is None else (("authorization", call.authorization),)
    try:
        await method(call.request, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as error:
        return status_of_rpc_error(error)
    return status_pb2.Status(code=code_pb2.OK, message="the call succeeded")


async def check_rest(rest: httpx.AsyncClient, call: Call, expect: Expect) -> None:
    headers = {} if call.authorization is None else {"authorization": call.authorization}
    if call.http.content is not None:
        headers["content-type"] = "application/json"
    response = await rest.request(
        call.http.method,
        call.http.path,
        params=call.http.params,
        headers=headers,
        json=call.http.json,
        content=call.http.content,
    )
    answer = f"{response.status_code} {response.text[:500]}"
    assert response.status_code < 500, answer
    assert response.status_code == expect.http_status, answer
    content_type = response.headers.get("content-type", "")
    if expect.envoy_text is not None and not content_type.startswith("application/json"):
        # Envoy refused before any gRPC call: its own plain-text explanation.
        assert expect.envoy_text in response.text, answer
        return
    assert content_type.startswith("application/json"), answer
    status = status_of_json(json.loads(response.text))
    check_status(status, expect)


def _params() -> list[Any]:
    return [
        pytest.param(case_, transport, id=f"{case_.name}-{transport}")
        for case_ in CASES
        for transport in case_.transports
    ]


@pytest.mark.parametrize(("bad", "transport"), _params())
async def test_bad_input_is_refused_precisely_and_changes_nothing(
    bad: Case,
    transport: str,
    stack: Stack,
    env: Env,
    channel: grpc.aio.Channel,
    rest: httpx.AsyncClient,
) -> None:
    call, expect = await bad.arrange(env)
    before = table_snapshot(stack.database_url)

    if transport == GRPC:
        check_status(await refusal_over_grpc(channel, call), expect)
    else:
        await check_rest(rest, call, expect)

    after = table_snapshot(stack.database_url)
    for table, rows in before.items():
        assert after[table] == rows, f"{bad.name} over {transport} changed {table}"


# --- details worth more than a code ---------------------------------------------------------


@pytest.mark.parametrize("transport", BOTH)
async def test_out_of_stock_names_every_short_line_and_keeps_stock(
    transport: str,
    stack: Stack,
    env: Env,
    channel: grpc.aio.Channel,
    rest: httpx.AsyncClient,
) -> None:
    plenty, short_a, short_b = env.product(stock=50), env.product(stock=1), env.product(stock=0)
    call = create_order(env.customer(), [(plenty, 5), (short_a, 2), (short_b, 1)])

    if transport == GRPC:
        status = await refusal_over_grpc(channel, call)
    else:
        headers = {"authorization": call.authorization or ""}
        response = await rest.post("/v1/orders", json=call.http.json, headers=headers)
        assert response.status_code == 400, response.text
        status = status_of_json(response.json())

    assert code_name(status.code) == "FAILED_PRECONDITION"
    [failure] = details_of(status, error_details_pb2.PreconditionFailure)
    assert {(v.type, v.subject) for v in failure.violations} == {
        ("OUT_OF_STOCK", f"products/{short_a}"),
        ("OUT_OF_STOCK", f"products/{short_b}"),
    }
    assert [stock_of(stack.database_url, p) for p in (plenty, short_a, short_b)] == [50, 1, 0]


def test_there_are_enough_cases() -> None:
    names = [case_.name for case_ in CASES]
    assert len(names) == len(set(names))
    assert sum(1 for case_ in CASES if set(case_.transports) == set(BOTH)) >= 25


async def test_unknown_json_fields_are_ignored_and_cannot_change_the_customer(
    stack: Stack, rest: httpx.AsyncClient, tokens: Tokens
) -> None:
    """Envoy's transcoder drops JSON fields the request message does not define (it has no
    option to refuse them, unlike query parameters), exactly as protobuf ignores unknown
    fields on gRPC. What matters is that nothing a body says can override the caller: the
    customer is always the token's subject."""
    product_id = insert_product(stack.database_url, stock=5)
    subject = f"honest-{uuid.uuid4().hex[:8]}"
    response = await rest.post(
        "/v1/orders",
        json={
            "requestId": str(uuid.uuid4()),
            "items": [{"productId": product_id, "quantity": 1}],
            "customerId": "somebody-else",
            "status": "ORDER_STATUS_PAID",
        },
        headers={"authorization": f"Bearer {tokens.customer(subject)}"},
    )
    assert response.status_code == 200, response.text
    order = response.json()["order"]
    assert order["customerId"] == subject
    assert order["status"] == "ORDER_STATUS_PENDING_PAYMENT"
    assert stock_of(stack.database_url, product_id) == 4
