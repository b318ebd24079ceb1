"""What the edge and the server accept, and what they answer past it (docs/operations.md,
"Limits at the edge"): sizes of REST bodies, headers and gRPC messages."""

from __future__ import annotations

import asyncio
import dataclasses
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
from tests.e2e.edge import check_retry_later, parse_status
from tests.e2e.statuses import details_of, status_of_rpc_error
from tests.stack import Stack, bearer

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


def _padded_order(product_id: str, size: int) -> bytes:
    """A valid CreateOrder body of exactly `size` bytes, padded with whitespace (a field the
    message does not have would be refused: UNKNOWN_FIELD)."""
    order = {"requestId": str(uuid.uuid4()), "items": [{"productId": product_id, "quantity": 1}]}
    bare = json.dumps(order).encode()
    body = bare[:-1] + b" " * (size - len(bare)) + b"}"
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


# Rate limits per client and route class, and overload


def _client(base: str, address: str) -> httpx.AsyncClient:
    """REST from a loopback address of its own: Envoy sees each as another client."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=base, transport=transport, timeout=30)


def _orders_of(database_url: str, customer: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM orders WHERE customer_id = %s", (customer,)
        ).fetchone()
    assert row is not None
    count: int = row[0]
    return count


async def test_each_client_has_its_own_rate_and_writes_are_tighter_than_reads(
    stack: Stack, tmp_path: Path, tokens: Tokens
) -> None:
    """Writes at 1 a second with a burst of 3: 20 orders at once from one address get at
    most a few through (one more per second that passes) and the rest 429, written nowhere;
    the same address still reads, and another address still orders."""
    limits = EdgeLimits(rate_limit_writes=1, rate_limit_writes_burst=3)
    product_id = insert_product(stack.database_url, stock=1_000)
    customer = f"flash-{uuid.uuid4().hex[:8]}"
    headers = {"authorization": f"Bearer {tokens.customer(customer)}"}

    def order() -> dict[str, object]:
        line = {"productId": product_id, "quantity": 1}
        return {"requestId": str(uuid.uuid4()), "items": [line]}

    with envoy_in_front_of(stack.grpc_port, tmp_path, limits=limits) as envoy:
        base = f"http://127.0.0.1:{envoy.http_port}"
        async with _client(base, "127.0.0.2") as first, _client(base, "127.0.0.3") as second:
            answers = await asyncio.gather(
                *(first.post("/v1/orders", json=order(), headers=headers) for _ in range(20))
            )
            placed = [a for a in answers if a.status_code == 200]
            for refused in (a for a in answers if a.status_code != 200):
                check_retry_later(refused, 429, code_pb2.RESOURCE_EXHAUSTED, "RATE_LIMITED")
            assert 3 <= len(placed) < 20
            assert _orders_of(stack.database_url, customer) == len(placed)

            read = await first.get(f"/v1/products/{product_id}")
            assert read.status_code == 200, read.text[:300]
            elsewhere = await second.post("/v1/orders", json=order(), headers=headers)
            assert elsewhere.status_code == 200, elsewhere.text[:300]

        # gRPC through Envoy, from a third address: AdjustStock is in the others class.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy.http_port}") as channel:
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
            request = catalog_pb2.AdjustStockRequest(id=product_id, delta=1, reason="t")
            outcomes = await asyncio.gather(
                *(
                    catalog.AdjustStock(request, metadata=bearer(tokens.customer()))
                    for _ in range(60)
                ),
                return_exceptions=True,
            )
    codes = {o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)}
    # The others class (40 at once): customers may not adjust stock, so every call that
    # passes is PERMISSION_DENIED, and the rest were refused before the server.
    assert codes == {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    limited = next(
        o
        for o in outcomes
        if isinstance(o, grpc.aio.AioRpcError) and o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    status = status_of_rpc_error(limited)
    [info] = details_of(status, error_details_pb2.ErrorInfo)
    assert info.reason == "RATE_LIMITED"
    assert details_of(status, error_details_pb2.RetryInfo)


async def test_overload_is_a_json_503_with_retry_after(stack: Stack, tmp_path: Path) -> None:
    """Past the calls in flight and waiting that Envoy allows towards the server, callers
    are answered at once: JSON 503 UNAVAILABLE with retry-after, never plain text."""
    limits = dataclasses.replace(
        EdgeLimits.without_rate_limits(),
        upstream_max_connections=1,
        upstream_max_requests=1,
        upstream_max_pending_requests=1,
    )
    with envoy_in_front_of(stack.grpc_port, tmp_path, limits=limits) as envoy:
        base = f"http://127.0.0.1:{envoy.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as rest:
            answers = await asyncio.gather(
                *(rest.get("/v1/products", params={"pageSize": "200"}) for _ in range(100))
            )
            overflows = await rest.get(
                f"http://127.0.0.1:{envoy.admin_port}/stats",
                # Envoy sheds through either breaker (waiting or in flight), which one
                # depending on timing: retries and health checks since the fleet changed it.
                params={
                    "filter": "^cluster.marketplace_grpc.upstream_rq_(pending|active)_overflow$"
                },
            )
    shed = [a for a in answers if a.status_code != 200]
    assert shed, "100 calls at once never passed 1 in flight and 1 waiting"
    assert len(shed) < len(answers)
    for answer in shed:
        check_retry_later(answer, 503, code_pb2.UNAVAILABLE, "SERVICE_UNAVAILABLE")
    shed_by_breakers = sum(
        int(line.partition(": ")[2]) for line in overflows.text.splitlines() if ": " in line
    )
    assert shed_by_breakers >= 1, overflows.text
