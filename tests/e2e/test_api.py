"""Every RPC, through MarketplaceClient over gRPC and through Envoy's REST/JSON routes.

Behaviour tests run once per transport: `RestApi` speaks the REST routes with httpx and
hands back the same protobuf messages and typed errors as `MarketplaceClient`, so one test
body proves both. The REST wire format itself (names, int64 strings) is checked raw below.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import status_pb2

from marketplace.catalog.v1 import catalog_pb2
from marketplace.order.v1 import order_pb2
from marketplace_client import (
    MarketplaceClient,
    NotFoundError,
    OutOfStockError,
    Page,
    PreconditionViolation,
    RequestIdReusedError,
    follow_pages,
    to_decimal,
    to_money,
)
from marketplace_client.errors import MarketplaceError, from_rpc_error
from tests.conftest import Tokens, insert_product, stock_of
from tests.stack import Stack

pytestmark = pytest.mark.e2e

MessageT = TypeVar("MessageT", bound=Message)

# The HTTP status Envoy's transcoder answers for each gRPC code.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
}


class RestApi:
    """The REST routes behind MarketplaceClient's method names, for one caller."""

    def __init__(self, http: httpx.AsyncClient, token: str | None) -> None:
        self._http = http
        self._headers = {"authorization": f"Bearer {token}"} if token else {}

    async def list_products_page(
        self, page_size: int = 0, page_token: str = ""
    ) -> Page[catalog_pb2.Product]:
        response = await self._send("GET", "/v1/products", params=_page(page_size, page_token))
        return Page(
            [_parse(p, catalog_pb2.Product()) for p in _listing(response, "products")],
            response.json()["nextPageToken"],
        )

    def list_products(self, page_size: int = 0) -> AsyncIterator[catalog_pb2.Product]:
        return follow_pages(self.list_products_page, page_size)

    async def get_product(self, product_id: str) -> catalog_pb2.Product:
        response = await self._send("GET", f"/v1/products/{product_id}")
        return _parse(_only(response, "product"), catalog_pb2.Product())

    async def create_product(
        self,
        *,
        sku: str,
        name: str,
        price: Decimal | str,
        currency: str,
        description: str = "",
        stock: int = 0,
    ) -> catalog_pb2.Product:
        body = {
            "sku": sku,
            "name": name,
            "description": description,
            "price": json_format.MessageToDict(to_money(price, currency)),
            "stock": str(stock),
        }
        response = await self._send("POST", "/v1/products", json=body)
        return _parse(_only(response, "product"), catalog_pb2.Product())

    async def update_product(
        self, product_id: str, *, name: str | None = None, description: str | None = None
    ) -> catalog_pb2.Product:
        body = {"name": name, "description": description}
        mask = ",".join(field for field, value in body.items() if value is not None)
        response = await self._send(
            "PATCH",
            f"/v1/products/{product_id}",
            params={"updateMask": mask},
            json={k: v for k, v in body.items() if v is not None},
        )
        return _parse(_only(response, "product"), catalog_pb2.Product())

    async def adjust_stock(
        self, product_id: str, delta: int, reason: str, request_id: str | None = None
    ) -> catalog_pb2.Product:
        body = {"delta": delta, "reason": reason, "requestId": request_id or str(uuid.uuid4())}
        response = await self._send("POST", f"/v1/products/{product_id}:adjustStock", json=body)
        return _parse(_only(response, "product"), catalog_pb2.Product())

    async def create_order(
        self, items: Sequence[tuple[str, int]], request_id: str | None = None
    ) -> order_pb2.Order:
        body = {
            "requestId": request_id or str(uuid.uuid4()),
            "items": [{"productId": p, "quantity": q} for p, q in items],
        }
        response = await self._send("POST", "/v1/orders", json=body)
        return _parse(_only(response, "order"), order_pb2.Order())

    async def get_order(self, order_id: str) -> order_pb2.Order:
        response = await self._send("GET", f"/v1/orders/{order_id}")
        return _parse(_only(response, "order"), order_pb2.Order())

    async def list_orders_page(
        self, page_size: int = 0, page_token: str = ""
    ) -> Page[order_pb2.Order]:
        response = await self._send("GET", "/v1/orders", params=_page(page_size, page_token))
        return Page(
            [_parse(o, order_pb2.Order()) for o in _listing(response, "orders")],
            response.json()["nextPageToken"],
        )

    def list_orders(self, page_size: int = 0) -> AsyncIterator[order_pb2.Order]:
        return follow_pages(self.list_orders_page, page_size)

    async def cancel_order(self, order_id: str, request_id: str | None = None) -> order_pb2.Order:
        body = {"requestId": request_id or str(uuid.uuid4())}
        response = await self._send("POST", f"/v1/orders/{order_id}:cancel", json=body)
        return _parse(_only(response, "order"), order_pb2.Order())

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self._http.request(method, path, headers=self._headers, **kwargs)
        if response.status_code != 200:
            raise _rest_error(response)
        return response


def _page(page_size: int, page_token: str) -> dict[str, str | int]:
    params: dict[str, str | int] = {"pageSize": page_size}
    if page_token:
        params["pageToken"] = page_token
    return params


def _only(response: httpx.Response, key: str) -> dict[str, Any]:
    body = response.json()
    assert list(body) == [key], body
    value: dict[str, Any] = body[key]
    return value


def _listing(response: httpx.Response, key: str) -> list[dict[str, Any]]:
    body = response.json()
    assert set(body) == {key, "nextPageToken"}, body
    items: list[dict[str, Any]] = body[key]
    return items


def _parse(value: dict[str, Any], message: MessageT) -> MessageT:
    # Strict: an unknown (say, snake_case) field name fails the test.
    return json_format.ParseDict(value, message)


def _rest_error(response: httpx.Response) -> MarketplaceError:
    """Envoy renders the gRPC status as a JSON google.rpc.Status; decode it exactly as the
    client decodes grpc-status-details-bin, so REST errors are asserted like gRPC ones."""
    status = json_format.ParseDict(response.json(), status_pb2.Status())
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    assert response.status_code == HTTP_STATUS[code], (response.status_code, code)
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return from_rpc_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, status.message))


Api = MarketplaceClient | RestApi
Connect = Callable[[str | None], Api]


@pytest.fixture(params=["grpc", "rest"])
def connect(
    request: pytest.FixtureRequest, channel: grpc.aio.Channel, rest: httpx.AsyncClient
) -> Connect:
    """Builds an API for a caller's token, over the transport the test is parametrized with."""
    if request.param == "grpc":
        return lambda token: MarketplaceClient(channel, token=token)
    return lambda token: RestApi(rest, token)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def collect(items: AsyncIterator[MessageT]) -> list[MessageT]:
    return [item async for item in items]


# Catalog


async def test_create_get_and_update_a_product(
    connect: Connect, tokens: Tokens, stack: Stack
) -> None:
    admin = connect(tokens.admin())
    sku = unique("CRT")
    created = await admin.create_product(
        sku=sku,
        name="Espresso cup",
        price="12.34",
        currency="EUR",
        description="Porcelain, 80 ml",
        stock=7,
    )
    uuid.UUID(created.id)
    assert (created.sku, created.name, created.description, created.stock) == (
        sku,
        "Espresso cup",
        "Porcelain, 80 ml",
        7,
    )
    assert (created.price.currency_code, to_decimal(created.price)) == ("EUR", Decimal("12.34"))
    assert created.create_time.seconds > 0
    assert stock_of(stack.database_url, created.id) == 7

    # Reads are public: no token needed.
    assert await connect(None).get_product(created.id) == created

    updated = await admin.update_product(created.id, name="Espresso cup, white")
    assert updated.name == "Espresso cup, white"
    assert (updated.sku, updated.description, updated.price, updated.stock) == (
        sku,
        "Porcelain, 80 ml",
        created.price,
        7,
    )
    assert updated.update_time.ToDatetime() >= created.update_time.ToDatetime()
    assert await admin.get_product(created.id) == updated


async def test_update_mask_limits_the_change(rest: httpx.AsyncClient, tokens: Tokens) -> None:
    """A PATCH body may carry more fields than the mask names; only the named ones change."""
    product_id = (
        await RestApi(rest, tokens.admin()).create_product(
            sku=unique("MASK"), name="Old", price="1", currency="USD", description="Keep me"
        )
    ).id
    response = await rest.patch(
        f"/v1/products/{product_id}",
        params={"updateMask": "name"},
        json={"name": "New", "description": "Not me"},
        headers={"authorization": f"Bearer {tokens.admin()}"},
    )
    assert response.status_code == 200, response.text
    product = response.json()["product"]
    assert (product["name"], product["description"]) == ("New", "Keep me")


async def test_adjust_stock_moves_stock_once_per_request_id(
    connect: Connect, tokens: Tokens, stack: Stack
) -> None:
    admin = connect(tokens.admin())
    product_id = insert_product(stack.database_url, stock=5)
    request_id = str(uuid.uuid4())

    added = await admin.adjust_stock(product_id, 3, "delivery", request_id)
    assert added.stock == 8
    replayed = await admin.adjust_stock(product_id, 3, "delivery", request_id)
    assert replayed.stock == 8
    assert stock_of(stack.database_url, product_id) == 8

    removed = await admin.adjust_stock(product_id, -6, "breakage")
    assert removed.stock == 2
    assert stock_of(stack.database_url, product_id) == 2

    with pytest.raises(RequestIdReusedError):
        await admin.adjust_stock(product_id, 4, "another delivery", request_id)
    assert stock_of(stack.database_url, product_id) == 2


async def test_list_products_pages_through_each_product_once_in_sku_order(
    connect: Connect, stack: Stack
) -> None:
    prefix = unique("PAGE")
    ours = [insert_product(stack.database_url, stock=1, sku=f"{prefix}-{n}") for n in range(5)]
    api = connect(None)

    pages: list[Page[catalog_pb2.Product]] = []
    token = ""
    while True:
        pages.append(await api.list_products_page(page_size=2, page_token=token))
        if not (token := pages[-1].next_page_token):
            break
    listed = [product for page in pages for product in page.items]

    assert all(len(page.items) == 2 for page in pages[:-1])
    assert 1 <= len(pages[-1].items) <= 2
    assert len({p.id for p in listed}) == len(listed)
    assert [p.id for p in listed if p.sku.startswith(prefix)] == ours
    assert len({n for n, page in enumerate(pages) for p in page.items if p.id in ours}) >= 3
    assert [p.id for p in await collect(api.list_products(page_size=2))] == [p.id for p in listed]


# Orders


async def test_order_reserves_stock_and_cancel_puts_it_back_once(
    connect: Connect, tokens: Tokens, stack: Stack
) -> None:
    subject = unique("buyer")
    customer = connect(tokens.customer(subject))
    cups = insert_product(stack.database_url, stock=10, price="2.50")
    saucers = insert_product(stack.database_url, stock=5, price="1.25")

    order = await customer.create_order([(saucers, 2), (cups, 3)])
    assert order.status == order_pb2.ORDER_STATUS_PENDING_PAYMENT
    assert order.customer_id == subject
    assert [(i.product_id, i.quantity) for i in order.items] == [(saucers, 2), (cups, 3)]
    assert [to_decimal(i.line_total) for i in order.items] == [Decimal("2.5"), Decimal("7.5")]
    assert (order.total.currency_code, to_decimal(order.total)) == ("USD", Decimal("10"))
    assert stock_of(stack.database_url, cups) == 7
    assert stock_of(stack.database_url, saucers) == 3
    assert await customer.get_order(order.id) == order

    cancelled = await customer.cancel_order(order.id)
    assert cancelled.status == order_pb2.ORDER_STATUS_CANCELLED
    assert stock_of(stack.database_url, cups) == 10
    assert stock_of(stack.database_url, saucers) == 5

    again = await customer.cancel_order(order.id)
    assert again == cancelled
    assert stock_of(stack.database_url, cups) == 10
    assert stock_of(stack.database_url, saucers) == 5
    assert await customer.get_order(order.id) == cancelled


async def test_repeated_create_order_returns_the_same_order_and_moves_stock_once(
    connect: Connect, tokens: Tokens, stack: Stack
) -> None:
    customer = connect(tokens.customer(unique("buyer")))
    product_id = insert_product(stack.database_url, stock=10)
    request_id = str(uuid.uuid4())

    first = await customer.create_order([(product_id, 4)], request_id=request_id)
    second = await customer.create_order([(product_id, 4)], request_id=request_id)
    assert second.id == first.id
    assert second == first
    assert stock_of(stack.database_url, product_id) == 6
    assert [o.id for o in await collect(customer.list_orders())] == [first.id]

    with pytest.raises(RequestIdReusedError) as reused:
        await customer.create_order([(product_id, 5)], request_id=request_id)
    assert reused.value.metadata["requestId"] == request_id
    assert stock_of(stack.database_url, product_id) == 6


async def test_out_of_stock_names_every_short_line_and_changes_nothing(
    connect: Connect, tokens: Tokens, stack: Stack
) -> None:
    customer = connect(tokens.customer(unique("buyer")))
    plenty = insert_product(stack.database_url, stock=10)
    short_a = insert_product(stack.database_url, stock=2)
    short_b = insert_product(stack.database_url, stock=0)
    wanted = {short_a: (3, 2), short_b: (1, 0)}

    with pytest.raises(OutOfStockError) as raised:
        await customer.create_order([(plenty, 1), (short_a, 3), (short_b, 1)])

    error = raised.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "OUT_OF_STOCK"
    assert error.metadata["productId"] in wanted
    requested, available = wanted[error.metadata["productId"]]
    assert (error.metadata["requested"], error.metadata["available"]) == (
        str(requested),
        str(available),
    )
    assert sorted(error.precondition_violations, key=lambda v: v.subject) == sorted(
        (
            PreconditionViolation(
                "OUT_OF_STOCK", f"products/{product_id}", f"requested {r}, available {a}"
            )
            for product_id, (r, a) in wanted.items()
        ),
        key=lambda v: v.subject,
    )
    assert [stock_of(stack.database_url, p) for p in (plenty, short_a, short_b)] == [10, 2, 0]
    assert await collect(customer.list_orders()) == []


async def test_customers_see_only_their_own_orders_and_admins_see_all(
    connect: Connect, tokens: Tokens, stack: Stack
) -> None:
    alice = connect(tokens.customer(unique("alice")))
    bob = connect(tokens.customer(unique("bob")))
    admin = connect(tokens.admin())
    product_id = insert_product(stack.database_url, stock=10)
    alices = [(await alice.create_order([(product_id, 1)])).id for _ in range(2)]
    bobs = [(await bob.create_order([(product_id, 1)])).id]

    assert [o.id for o in await collect(alice.list_orders())] == alices[::-1]
    assert [o.id for o in await collect(bob.list_orders())] == bobs
    seen_by_admin = [o.id for o in await collect(admin.list_orders())]
    assert set(alices + bobs) <= set(seen_by_admin)
    assert [i for i in seen_by_admin if i in alices + bobs] == [*bobs, *alices[::-1]]

    # Another customer's order does not exist as far as bob can tell, and he cannot cancel it.
    with pytest.raises(NotFoundError):
        await bob.get_order(alices[0])
    with pytest.raises(NotFoundError):
        await bob.cancel_order(alices[0])
    assert (await alice.get_order(alices[0])).status == order_pb2.ORDER_STATUS_PENDING_PAYMENT
    assert (await admin.get_order(alices[0])).customer_id == (
        await alice.get_order(alices[0])
    ).customer_id
    assert stock_of(stack.database_url, product_id) == 7


async def test_list_orders_pages_newest_first_each_order_once(
    connect: Connect, tokens: Tokens, stack: Stack
) -> None:
    customer = connect(tokens.customer(unique("buyer")))
    product_id = insert_product(stack.database_url, stock=10)
    placed = [(await customer.create_order([(product_id, 1)])).id for _ in range(5)]

    first = await customer.list_orders_page(page_size=2)
    second = await customer.list_orders_page(page_size=2, page_token=first.next_page_token)
    third = await customer.list_orders_page(page_size=2, page_token=second.next_page_token)

    assert [len(p.items) for p in (first, second, third)] == [2, 2, 1]
    assert first.next_page_token
    assert second.next_page_token
    assert third.next_page_token == ""
    listed = [o.id for p in (first, second, third) for o in p.items]
    assert listed == placed[::-1]
    assert [o.id for o in await collect(customer.list_orders(page_size=2))] == listed
    times = [o.create_time.ToDatetime() for p in (first, second, third) for o in p.items]
    assert times == sorted(times, reverse=True)


# The REST wire format


async def test_rest_speaks_lower_camel_case_with_int64_as_strings(
    rest: httpx.AsyncClient, tokens: Tokens, stack: Stack
) -> None:
    admin = {"authorization": f"Bearer {tokens.admin()}"}
    customer = {"authorization": f"Bearer {tokens.customer(unique('buyer'))}"}
    body = {
        "sku": unique("WIRE"),
        "name": "Teapot",
        "price": {"currencyCode": "GBP", "units": "20", "nanos": 500_000_000},
        "stock": "3",
    }

    created = await rest.post("/v1/products", json=body, headers=admin)
    assert created.status_code == 200, created.text
    product = created.json()["product"]
    assert set(product) == {
        "id",
        "sku",
        "name",
        "description",
        "price",
        "stock",
        "createTime",
        "updateTime",
        "inventorySource",
    }
    assert product["stock"] == "3"
    assert product["inventorySource"] == "INVENTORY_SOURCE_MANAGED_HERE"  # enums by name
    assert product["price"] == {"currencyCode": "GBP", "units": "20", "nanos": 500_000_000}

    adjusted = await rest.post(
        f"/v1/products/{product['id']}:adjustStock",
        json={"delta": "2", "reason": "restock", "requestId": str(uuid.uuid4())},
        headers=admin,
    )
    assert adjusted.json()["product"]["stock"] == "5"

    placed = await rest.post(
        "/v1/orders",
        json={
            "requestId": str(uuid.uuid4()),
            "items": [{"productId": product["id"], "quantity": 2}],
        },
        headers=customer,
    )
    assert placed.status_code == 200, placed.text
    order = placed.json()["order"]
    assert order["status"] == "ORDER_STATUS_PENDING_PAYMENT"
    assert {"id", "customerId", "items", "total", "createTime", "updateTime"} <= set(order)
    assert order["items"][0]["productId"] == product["id"]
    assert order["items"][0]["quantity"] == 2
    assert order["items"][0]["unitPrice"]["units"] == "20"
    assert order["total"] == {"currencyCode": "GBP", "units": "41", "nanos": 0}
    assert stock_of(stack.database_url, product["id"]) == 3

    listed = await rest.get("/v1/orders", params={"pageSize": 10}, headers=customer)
    assert listed.json() == {"orders": [order], "nextPageToken": ""}
    missing = await rest.get(f"/v1/orders/{uuid.uuid4()}", headers=customer)
    assert missing.status_code == 404
    assert missing.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]
