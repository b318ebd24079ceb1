"""Catalog use cases on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from server.domain.catalog import PriceInput, new_product, product_changes, stock_adjustment
from server.domain.errors import AlreadyExists, FailedPrecondition, NotFound, RequestIdReused
from server.services.catalog import Catalog
from tests.conftest import insert_product, stock_of

pytestmark = pytest.mark.integration


def sku() -> str:
    return f"SKU-{uuid.uuid4().hex[:10]}"


async def test_create_then_get_round_trips_exact_prices(catalog: Catalog) -> None:
    draft = new_product(
        sku=sku(), name="Lamp", description="", price=PriceInput("EUR", 19, 990_000_000), stock=3
    )
    created = await catalog.create_product(draft)
    fetched = await catalog.get_product(created.id)
    assert fetched == created
    assert fetched.price.units_nanos() == (19, 990_000_000)


async def test_duplicate_sku_is_already_exists(catalog: Catalog) -> None:
    draft = new_product(sku=sku(), name="A", description="", price=PriceInput("USD", 1, 0), stock=0)
    await catalog.create_product(draft)
    with pytest.raises(AlreadyExists):
        await catalog.create_product(draft)


async def test_update_changes_only_masked_fields(catalog: Catalog, database_url: str) -> None:
    product_id = insert_product(database_url, stock=4, price="5.00")
    before = await catalog.get_product(product_id)
    changes = product_changes(
        ["name"], sku="IGNORED", name="Renamed", description="ignored", price=None
    )
    after = await catalog.update_product(product_id, changes)
    assert after.name == "Renamed"
    assert (after.sku, after.description, after.price, after.stock) == (
        before.sku,
        before.description,
        before.price,
        before.stock,
    )
    with pytest.raises(NotFound):
        await catalog.update_product(str(uuid.uuid4()), changes)


async def test_adjust_stock_is_idempotent_under_concurrent_retries(
    catalog: Catalog, database_url: str
) -> None:
    product_id = insert_product(database_url, stock=10)
    adjustment = stock_adjustment(product_id, 5, "delivery", f"adj-{uuid.uuid4()}")
    results = await asyncio.gather(*(catalog.adjust_stock("root", adjustment) for _ in range(10)))
    assert {r.stock for r in results} == {15}
    assert stock_of(database_url, product_id) == 15
    with pytest.raises(RequestIdReused):
        await catalog.adjust_stock(
            "root", stock_adjustment(product_id, 6, "delivery", adjustment.request_id)
        )


async def test_adjust_stock_never_goes_below_zero(catalog: Catalog, database_url: str) -> None:
    product_id = insert_product(database_url, stock=2)
    with pytest.raises(FailedPrecondition) as refused:
        await catalog.adjust_stock("root", stock_adjustment(product_id, -3, "loss", "adj-neg"))
    assert refused.value.metadata["available"] == "2"
    assert stock_of(database_url, product_id) == 2
    with pytest.raises(NotFound):
        await catalog.adjust_stock(
            "root", stock_adjustment(str(uuid.uuid4()), 1, "", f"adj-{uuid.uuid4()}")
        )


async def test_list_products_pages_by_sku_without_gaps(catalog: Catalog) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page, token = await catalog.list_products(2, token)
        seen += [p.sku for p in page]
        if not token:
            break
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen))
