"""What the edge and the server accept, and what they answer past it (docs/operations.md,
"Limits at the edge"): sizes of REST bodies, headers and gRPC messages."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import grpc
import httpx
import psycopg
import pytest
from google.rpc import code_pb2, error_details_pb2

from devstack.envoy import EdgeLimits, envoy_in_front_of
from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from marketplace_client import MarketplaceClient
from tests.conftest import Tokens, insert_product, table_snapshot
from tests.e2e.edge import parse_status
from tests.e2e.statuses import details_of
from tests.stack import Stack, bearer

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


def _padded_order(product_id: str, size: int) -> bytes:
    """A valid CreateOrder body of exactly `size` bytes, padded with a field the message does
    not have (the transcoder drops it)."""
    order = {"requestId": str(uuid.uuid4()), "items": [{"productId": product_id, "quantity": 1}]}
    bare = len(json.dumps({**order, "padding": ""}).encode())
    body = json.dumps({**order, "padding": "x" * (size - bare)}).encode()
    assert len(body) == size
    return body


def _check_too_large(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, response.text[:300]
    status = parse_status(response)
    assert status.code == code_pb2.INVALID_ARGUMENT
    [info] = details_of(status, error_details_pb2.ErrorInfo)
    assert info.reason == "REQUEST_TOO_LARGE"
    assert info.metadata["limitBytes"] == str(limit)


async def test_a_rest_body_over_a_mebibyte_is_413_and_changes_nothing(
    stack: Stack, rest: httpx.AsyncClient, tokens: Tokens
) -> None:
    """However it is sent: with a content-length, or chunked (no length known up front)."""
    product_id = insert_product(stack.database_url, stock=5)
    headers = {"authorization": f"Bearer {tokens.customer(f'big-{uuid.uuid4().hex[:8]}')}"}
    before = table_snapshot(stack.database_url)
    body = _padded_order(product_id, 2 * MIB)

    _check_too_large(await rest.post("/v1/orders", content=body, headers=headers), MIB)

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    _check_too_large(await rest.post("/v1/orders", content=chunked(), headers=headers), MIB)
    assert table_snapshot(stack.database_url) == before


async def test_a_rest_body_within_the_cap_is_served(
    stack: Stack, rest: httpx.AsyncClient, tokens: Tokens
) -> None:
    product_id = insert_product(stack.database_url, stock=5)
    token = tokens.customer(f"big-{uuid.uuid4().hex[:8]}")
    response = await rest.post(
        "/v1/orders",
        content=_padded_order(product_id, MIB - 1024),
        headers={"authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.text[:300]


async def test_rest_headers_within_the_cap_are_served_and_over_it_are_431(
    rest: httpx.AsyncClient,
) -> None:
    """Headers Envoy lets through must never meet the server's own limit (gRPC's default
    refused metadata over 8 KiB, which REST callers saw as 429)."""
    served = await rest.get("/v1/products", headers={"x-padding": "a" * 12_000})
    assert served.status_code == 200, served.text[:300]

    refused = await rest.get("/v1/products", headers={"x-padding": "a" * 17_000})
    assert refused.status_code == 431, refused.text[:300]
    status = parse_status(refused)
    assert status.code == code_pb2.INVALID_ARGUMENT
    [info] = details_of(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.metadata["limitKb"]) == ("HEADERS_TOO_LARGE", "16")


async def test_grpc_sizes_are_the_servers_settings(
    catalog_stub: catalog_pb2_grpc.CatalogServiceStub, tokens: Tokens
) -> None:
    """Metadata up to 64 KiB is read; a message over 4 MiB is refused by gRPC itself."""
    metadata = (*bearer(tokens.admin()), ("x-padding", "a" * 40_000))
    listed = await catalog_stub.ListProducts(
        catalog_pb2.ListProductsRequest(page_size=1), metadata=metadata, timeout=10
    )
    assert listed.products

    huge = catalog_pb2.Product(sku="HUGE", name="huge", description="d" * (4 * MIB + 1))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await catalog_stub.CreateProduct(
            catalog_pb2.CreateProductRequest(product=huge), metadata=bearer(tokens.admin())
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def a_page_of_large_products(stack: Stack) -> Iterator[int]:
    """1,000 products with 5,000-character descriptions, listed first (their SKUs sort
    first): a page of them is over 5 MB, past gRPC's default 4 MiB and Envoy's 1 MiB buffer.
    Deleted afterwards, so that other listings see the catalog as it was."""
    prefix = f"0-LARGE-{uuid.uuid4().hex[:8]}-"
    rows = [
        (str(uuid.uuid4()), f"{prefix}{n:04}", "d" * 5_000, Decimal("1.00")) for n in range(1_000)
    ]
    with psycopg.connect(stack.database_url) as conn, conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO products (id, sku, name, description, price_currency, price_amount,"
            " stock, create_time, update_time)"
            " VALUES (%s, %s, 'Large product', %s, 'USD', %s, 1, now(), now())",
            rows,
        )
    try:
        yield len(rows)
    finally:
        with psycopg.connect(stack.database_url) as conn:
            conn.execute("DELETE FROM products WHERE sku LIKE %s", (prefix + "%",))


async def test_the_largest_pages_reach_rest_and_client_callers(
    stack: Stack, rest: httpx.AsyncClient, a_page_of_large_products: int
) -> None:
    """The server may send up to 32 MiB, Envoy transcodes that much, the typed client reads
    that much (before: REST 500 "the transcoder's internal buffer size exceeds the configured
    limit", the client RESOURCE_EXHAUSTED)."""
    response = await rest.get("/v1/products", params={"pageSize": "1000"})
    assert response.status_code == 200, response.text[:300]
    assert len(response.content) > 5_000_000
    assert len(response.json()["products"]) == a_page_of_large_products

    async with MarketplaceClient(stack.grpc_target) as client:
        page = await client.list_products_page(page_size=1000)
    assert len(page.items) == a_page_of_large_products


async def test_the_body_cap_is_settable(stack: Stack, tmp_path: Path, tokens: Tokens) -> None:
    limits = EdgeLimits(rest_max_body_bytes=4096)
    product_id = insert_product(stack.database_url, stock=5)
    headers = {"authorization": f"Bearer {tokens.customer(f'big-{uuid.uuid4().hex[:8]}')}"}
    with envoy_in_front_of(stack.grpc_port, tmp_path, limits=limits) as envoy:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.http_port}") as rest:
            over = await rest.post(
                "/v1/orders", content=_padded_order(product_id, 4097), headers=headers
            )
            within = await rest.post(
                "/v1/orders", content=_padded_order(product_id, 4096), headers=headers
            )
    _check_too_large(over, 4096)
    assert within.status_code == 200, within.text[:300]
