"""Refusal tables: bad input through both doors. Every refusal is the specific status with its
rich details, the same through gRPC and through REST via Envoy, never INTERNAL/500, and the
database is exactly as it was before the request.

Each case arranges its own data (fresh products and token subjects: the database is shared
by the whole session) and returns the call to make plus what the refusal must look like.
The call is described once, as the gRPC method and request; its REST twin is derived from
the method's google.api.http rule, or given explicitly where the point is REST itself
(malformed JSON, an int64 where the proto says int32, unknown JSON fields and routes).
The tables, one per service, are the test_bad_input_*.py files.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from google.type import money_pb2

from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from marketplace.payment.v1 import payment_pb2
from server.api.errors import ERROR_DOMAIN
from tests.conftest import Tokens, insert_product, table_snapshot
from tests.e2e.statuses import (
    HTTP_STATUS_OF,
    code_name,
    detail_of,
    status_of_json,
    status_of_rpc_error,
)
from tests.stack import Stack, bearer

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
    content: str | bytes | None = None
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    """One request, as a gRPC call (`rpc` + `request`) and as its REST twin (`http`)."""

    rpc: str
    request: Message | bytes
    http: Http
    # A tuple sends one `authorization` entry (gRPC metadata, REST header) per value.
    authorization: str | tuple[str, ...] | None = None
    # Other headers, sent as gRPC metadata too (a webhook's `stripe-signature`).
    headers: tuple[tuple[str, str], ...] = ()

    def authorizations(self) -> tuple[str, ...]:
        if self.authorization is None:
            return ()
        if isinstance(self.authorization, str):
            return (self.authorization,)
        return self.authorization


def auth_header(token: str | None) -> str | None:
    return None if token is None else f"Bearer {token}"


def _path(value: str) -> str:
    return quote(value, safe="")


def _body(message: Message, *drop: str) -> dict[str, Any]:
    body = json_format.MessageToDict(message)
    for name in drop:
        body.pop(name, None)
    return body


def _page_params(page_size: int, page_token: str) -> dict[str, str]:
    params = {}
    if page_size:
        params["pageSize"] = str(page_size)
    if page_token:
        params["pageToken"] = page_token
    return params


def varint(value: int) -> bytes:
    """Protobuf wire format by hand, for messages the generated code refuses to build."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


# One builder per RPC.


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
        authorization or auth_header(token),
    )


def get_order(token: str | None, order_id: str) -> Call:
    request = order_pb2.GetOrderRequest(id=order_id)
    return Call(
        f"{ORDERS}/GetOrder",
        request,
        Http("GET", f"/v1/orders/{_path(order_id)}"),
        auth_header(token),
    )


def cancel_order(token: str | None, order_id: str, request_id: str = "") -> Call:
    request = order_pb2.CancelOrderRequest(id=order_id, request_id=request_id)
    http = Http("POST", f"/v1/orders/{_path(order_id)}:cancel", json=_body(request, "id"))
    return Call(f"{ORDERS}/CancelOrder", request, http, auth_header(token))


def list_orders(token: str | None, *, page_size: int = 0, page_token: str = "") -> Call:
    request = order_pb2.ListOrdersRequest(page_size=page_size, page_token=page_token)
    http = Http("GET", "/v1/orders", params=_page_params(page_size, page_token))
    return Call(f"{ORDERS}/ListOrders", request, http, auth_header(token))


def list_products(*, page_size: int = 0, page_token: str = "") -> Call:
    request = catalog_pb2.ListProductsRequest(page_size=page_size, page_token=page_token)
    http = Http("GET", "/v1/products", params=_page_params(page_size, page_token))
    return Call(f"{CATALOG}/ListProducts", request, http)


def get_product(product_id: str) -> Call:
    request = catalog_pb2.GetProductRequest(id=product_id)
    return Call(f"{CATALOG}/GetProduct", request, Http("GET", f"/v1/products/{_path(product_id)}"))


def create_product(token: str | None, product: catalog_pb2.Product) -> Call:
    request = catalog_pb2.CreateProductRequest(product=product)
    http = Http("POST", "/v1/products", json=_body(product))
    return Call(f"{CATALOG}/CreateProduct", request, http, auth_header(token))


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
    return Call(f"{CATALOG}/UpdateProduct", request, http, auth_header(token))


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
    return Call(f"{CATALOG}/AdjustStock", request, http, auth_header(token))


def create_payment(
    token: str | None, order_id: str, payment_method: str, request_id: str | None = None
) -> Call:
    request = payment_pb2.CreatePaymentRequest(
        order_id=order_id,
        request_id=str(uuid.uuid4()) if request_id is None else request_id,
        payment_method=payment_method,
    )
    http = Http("POST", f"/v1/orders/{_path(order_id)}/payments", json=_body(request, "orderId"))
    return Call(f"{PAYMENTS}/CreatePayment", request, http, auth_header(token))


def refund_payment(
    token: str | None, payment_id: str, amount: money_pb2.Money | None = None
) -> Call:
    request = payment_pb2.RefundPaymentRequest(
        id=payment_id, request_id=str(uuid.uuid4()), reason="bad-input test"
    )
    if amount is not None:
        request.amount.CopyFrom(amount)
    http = Http("POST", f"/v1/payments/{_path(payment_id)}:refund", json=_body(request, "id"))
    return Call(f"{PAYMENTS}/RefundPayment", request, http, auth_header(token))


def get_payment(token: str | None, payment_id: str) -> Call:
    request = payment_pb2.GetPaymentRequest(id=payment_id)
    http = Http("GET", f"/v1/payments/{_path(payment_id)}")
    return Call(f"{PAYMENTS}/GetPayment", request, http, auth_header(token))


def list_payments(token: str | None, order_id: str, page_token: str = "") -> Call:
    request = payment_pb2.ListPaymentsRequest(order_id=order_id, page_token=page_token)
    http = Http("GET", f"/v1/orders/{_path(order_id)}/payments", params=_page_params(0, page_token))
    return Call(f"{PAYMENTS}/ListPayments", request, http, auth_header(token))


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
    # When Envoy itself refuses the REST request (transcoding failed, so the server never
    # saw it): the HTTP status and a text its JSON google.rpc.Status's message must contain,
    # and that Status's code where it differs from the gRPC twin's (an unknown route is
    # NOT_FOUND over REST, UNIMPLEMENTED over gRPC).
    envoy_status: int | None = None
    envoy_text: str | None = None
    rest_code: int | None = None

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
        assert info.domain == ERROR_DOMAIN
        assert dict(info.metadata).items() >= dict(expect.metadata).items(), info.metadata
    if expect.resource is not None:
        resource = detail_of(status, error_details_pb2.ResourceInfo)
        assert (resource.resource_type, resource.resource_name) == expect.resource


# --- sending it and checking the answer -----------------------------------------------------


async def refusal_over_grpc(channel: grpc.aio.Channel, call: Call) -> status_pb2.Status:
    serialize = None if isinstance(call.request, bytes) else type(call.request).SerializeToString
    method = channel.unary_unary(call.rpc, request_serializer=serialize)
    metadata = tuple(("authorization", value) for value in call.authorizations()) + call.headers
    try:
        await method(call.request, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as error:
        return status_of_rpc_error(error)
    return status_pb2.Status(code=code_pb2.OK, message="the call succeeded")


async def over_rest(rest: httpx.AsyncClient, call: Call) -> httpx.Response:
    headers = [("authorization", value) for value in call.authorizations()] + list(call.headers)
    if call.http.content is not None:
        headers.append(("content-type", "application/json"))
    return await rest.request(
        call.http.method,
        call.http.path,
        params=call.http.params,
        headers=headers,
        json=call.http.json,
        content=call.http.content,
    )


# Attempts at an upload Envoy refuses for its size (413).
_OVERSIZED_ATTEMPTS = 3


async def _answer_over_rest(rest: httpx.AsyncClient, call: Call, expect: Expect) -> httpx.Response:
    """Envoy answers 413 before reading an oversized body and then closes the connection;
    when the client is still sending (a loaded machine), the close can reset the socket
    before the 413 is read, which any HTTP client sees as a broken connection. Such a call
    is sent again: it changed nothing, and the test is about the answer."""
    for attempt in range(1, _OVERSIZED_ATTEMPTS + 1):
        try:
            return await over_rest(rest, call)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            if expect.envoy_status != 413 or attempt == _OVERSIZED_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def check_rest(rest: httpx.AsyncClient, call: Call, expect: Expect) -> None:
    response = await _answer_over_rest(rest, call, expect)
    answer = f"{response.status_code} {response.text[:500]}"
    assert response.status_code < 500, answer
    assert response.status_code == expect.http_status, answer
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith("application/json"), answer
    status = status_of_json(json.loads(response.text))
    if expect.envoy_text is not None:
        # Envoy refused before any gRPC call: its own Status, which names no field (its
        # message does).
        assert code_name(status.code) == code_name(expect.rest_code or expect.code), answer
        assert expect.envoy_text in status.message, answer
        return
    check_status(status, _as_rest_caller_names_them(expect))


def _as_rest_caller_names_them(expect: Expect) -> Expect:
    """REST field violations name fields by their JSON (lowerCamelCase) names."""
    if expect.fields is None:
        return expect
    camel = {re.sub(r"_([a-z0-9])", lambda m: m[1].upper(), name) for name in expect.fields}
    return replace(expect, fields=frozenset(camel))


# --- the table ------------------------------------------------------------------------------


@dataclass
class Env:
    """What a case may use to arrange its data (never the thing under test)."""

    database_url: str
    tokens: Tokens
    catalog: catalog_pb2_grpc.CatalogServiceStub
    orders: order_pb2_grpc.OrderServiceStub

    @classmethod
    def on(cls, database_url: str, tokens: Tokens, channel: grpc.aio.Channel) -> Env:
        return cls(
            database_url,
            tokens,
            catalog_pb2_grpc.CatalogServiceStub(channel),
            order_pb2_grpc.OrderServiceStub(channel),
        )

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


@dataclass(frozen=True)
class Case:
    name: str
    arrange: Arrange
    transports: tuple[str, ...]


class RefusalTable:
    """One service's bad requests, each registered with `@table.case(name)`."""

    def __init__(self) -> None:
        self.cases: list[Case] = []

    def case(
        self, name: str, *, transports: tuple[str, ...] = BOTH
    ) -> Callable[[Arrange], Arrange]:
        def register(arrange: Arrange) -> Arrange:
            self.cases.append(Case(name, arrange, transports))
            return arrange

        return register

    def test(self) -> Callable[..., Awaitable[None]]:
        """The table's test, for its module to bind to a `test_` name after its last case:
        every case over each of its transports gets the refusal it expects and changes no
        row."""
        params = [
            pytest.param(case_, transport, id=f"{case_.name}-{transport}")
            for case_ in self.cases
            for transport in case_.transports
        ]

        @pytest.mark.parametrize(("bad", "transport"), params)
        async def test_bad_input_is_refused_precisely_and_changes_nothing(
            bad: Case,
            transport: str,
            stack: Stack,
            tokens: Tokens,
            channel: grpc.aio.Channel,
            rest: httpx.AsyncClient,
        ) -> None:
            call, expect = await bad.arrange(Env.on(stack.database_url, tokens, channel))
            before = table_snapshot(stack.database_url)

            if transport == GRPC:
                check_status(await refusal_over_grpc(channel, call), expect)
            else:
                await check_rest(rest, call, expect)

            after = table_snapshot(stack.database_url)
            for table, rows in before.items():
                assert after[table] == rows, f"{bad.name} over {transport} changed {table}"

        return test_bad_input_is_refused_precisely_and_changes_nothing
