"""Refusals of CatalogService: admin-only writes, product fields, stock adjustments, and
list page tokens. How a table runs is tests/e2e/refusals.py."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from google.rpc import code_pb2
from google.type import money_pb2

from marketplace.catalog.v1 import catalog_pb2
from server.domain.pagination import encode_page_token
from tests.e2e.refusals import (
    REST,
    SQL_INJECTION,
    Call,
    Env,
    Expect,
    RefusalTable,
    adjust_stock,
    already_exists,
    create_product,
    denied,
    get_product,
    invalid,
    list_products,
    not_found,
    precondition,
    update_product,
)
from tests.stack import bearer

pytestmark = pytest.mark.e2e

CASES = RefusalTable()


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


def _priced(currency: str, units: int, nanos: int = 0) -> catalog_pb2.Product:
    return new_product(price=money_pb2.Money(currency_code=currency, units=units, nanos=nanos))


@CASES.case("customer-creates-product")
async def customer_creates_product(env: Env) -> tuple[Call, Expect]:
    return create_product(env.customer(), new_product()), denied("admin")


@CASES.case("customer-adjusts-stock")
async def customer_adjusts_stock(env: Env) -> tuple[Call, Expect]:
    return adjust_stock(env.customer(), env.product(), 5), denied("admin")


# Listing


@CASES.case("garbage-page-token")
async def garbage_page_token(env: Env) -> tuple[Call, Expect]:
    return list_products(page_token="%%% not a token %%%"), invalid("page_token")


@CASES.case("negative-page-size")
async def negative_page_size(env: Env) -> tuple[Call, Expect]:
    return list_products(page_size=-1), invalid("page_size")


@CASES.case("products-page-token-with-nul")
async def products_token_with_nul(env: Env) -> tuple[Call, Expect]:
    token = encode_page_token("products", "*", {"sku": "\x00"})
    return list_products(page_token=token), invalid("page_token")


# Writes


@CASES.case("sql-injection-in-sku-and-name")
async def injected_sku_and_name(env: Env) -> tuple[Call, Expect]:
    """The name may hold any text (it is only ever a bound parameter); the SKU may not."""
    product = new_product(sku=SQL_INJECTION, name=SQL_INJECTION)
    return create_product(env.tokens.admin(), product), invalid("product.sku")


@CASES.case("name-201-chars")
async def overlong_name(env: Env) -> tuple[Call, Expect]:
    return create_product(env.tokens.admin(), new_product(name="n" * 201)), invalid("product.name")


@CASES.case("description-5001-chars")
async def overlong_description(env: Env) -> tuple[Call, Expect]:
    product = new_product(description="d" * 5001)
    return create_product(env.tokens.admin(), product), invalid("product.description")


@CASES.case("currency-XYZ")
async def unknown_currency(env: Env) -> tuple[Call, Expect]:
    return create_product(env.tokens.admin(), _priced("XYZ", 5)), invalid("product.price")


@CASES.case("currency-lowercase-usd")
async def lowercase_currency(env: Env) -> tuple[Call, Expect]:
    return create_product(env.tokens.admin(), _priced("usd", 5)), invalid("product.price")


@CASES.case("negative-price")
async def negative_price(env: Env) -> tuple[Call, Expect]:
    return create_product(env.tokens.admin(), _priced("USD", -1)), invalid("product.price")


@CASES.case("nanos-out-of-range")
async def nanos_out_of_range(env: Env) -> tuple[Call, Expect]:
    product = _priced("USD", 1, 1_000_000_000)
    return create_product(env.tokens.admin(), product), invalid("product.price")


@CASES.case("price-zero")
async def zero_price(env: Env) -> tuple[Call, Expect]:
    return create_product(env.tokens.admin(), _priced("USD", 0)), invalid("product.price")


@CASES.case("price-a-tenth-of-a-cent")
async def price_below_a_cent(env: Env) -> tuple[Call, Expect]:
    product = _priced("USD", 0, 1_000_000)  # USD 0.001
    return create_product(env.tokens.admin(), product), invalid("product.price")


@CASES.case("price-half-a-yen")
async def price_half_a_yen(env: Env) -> tuple[Call, Expect]:
    product = _priced("JPY", 100, 500_000_000)  # the yen has no minor unit
    return create_product(env.tokens.admin(), product), invalid("product.price")


@CASES.case("price-finer-than-a-fils")
async def price_below_a_fils(env: Env) -> tuple[Call, Expect]:
    product = _priced("KWD", 1, 500_000)  # KWD 1.0005: the dinar has three decimals
    return create_product(env.tokens.admin(), product), invalid("product.price")


@CASES.case("update-price-to-zero")
async def update_price_to_zero(env: Env) -> tuple[Call, Expect]:
    product = catalog_pb2.Product(
        id=env.product(), price=money_pb2.Money(currency_code="USD", units=0, nanos=0)
    )
    return update_product(env.tokens.admin(), product, ["price"]), invalid("product.price")


@CASES.case("update-price-to-half-a-yen")
async def update_price_half_a_yen(env: Env) -> tuple[Call, Expect]:
    price = money_pb2.Money(currency_code="JPY", units=100, nanos=500_000_000)
    product = catalog_pb2.Product(id=env.product(currency="JPY"), price=price)
    return update_product(env.tokens.admin(), product, ["price"]), invalid("product.price")


@CASES.case("missing-price")
async def missing_price(env: Env) -> tuple[Call, Expect]:
    product = new_product(price=None)
    return create_product(env.tokens.admin(), product), invalid("product.price")


@CASES.case("duplicate-sku")
async def duplicate_sku(env: Env) -> tuple[Call, Expect]:
    sku = f"DUP-{uuid.uuid4().hex[:12]}"
    env.product(sku=sku)
    return create_product(env.tokens.admin(), new_product(sku=sku)), already_exists(sku)


@CASES.case("update-mask-stock")
async def update_mask_stock(env: Env) -> tuple[Call, Expect]:
    product = catalog_pb2.Product(id=env.product(stock=5), stock=500)
    return update_product(env.tokens.admin(), product, ["stock"]), invalid("update_mask")


@CASES.case("update-to-taken-sku")
async def update_to_taken_sku(env: Env) -> tuple[Call, Expect]:
    taken = f"TAKEN-{uuid.uuid4().hex[:12]}"
    env.product(sku=taken)
    product = catalog_pb2.Product(id=env.product(), sku=taken)
    return update_product(env.tokens.admin(), product, ["sku"]), already_exists(taken)


# The path names the product. A body field or query parameter naming another one is refused,
# never obeyed (Envoy's transcoder would let its value override the path's): the body by the
# transcoder's collision check, the query by a route of envoy.yaml.
PATH_OVERRIDDEN_BY_BODY = Expect(code_pb2.INVALID_ARGUMENT, envoy_status=400, envoy_text="conflict")


def _with_body_field(call: Call, name: str, value: str) -> Call:
    return replace(call, http=replace(call.http, json={**call.http.json, name: value}))


def _with_query(call: Call, name: str, value: str) -> Call:
    return replace(call, http=replace(call.http, params={**call.http.params, name: value}))


def _rename(env: Env, product_id: str) -> Call:
    product = catalog_pb2.Product(id=product_id, name="Renamed")
    return update_product(env.tokens.admin(), product, ["name"])


@CASES.case("update-with-another-products-id-in-the-body", transports=(REST,))
async def update_other_product_through_body(env: Env) -> tuple[Call, Expect]:
    call = _rename(env, env.product())
    return _with_body_field(call, "id", env.product()), PATH_OVERRIDDEN_BY_BODY


@CASES.case("update-with-another-products-id-in-the-query", transports=(REST,))
async def update_other_product_through_query(env: Env) -> tuple[Call, Expect]:
    call = _rename(env, env.product())
    return _with_query(call, "product.id", env.product()), Expect(code_pb2.INVALID_ARGUMENT)


@CASES.case("update-unknown-product")
async def update_unknown_product(env: Env) -> tuple[Call, Expect]:
    missing = str(uuid.uuid4())
    product = catalog_pb2.Product(id=missing, name="Renamed")
    return update_product(env.tokens.admin(), product, ["name"]), not_found("product", missing)


@CASES.case("get-product-sql-injection-id")
async def get_injected_product(env: Env) -> tuple[Call, Expect]:
    return get_product(SQL_INJECTION), invalid("id")


@CASES.case("get-unknown-product")
async def get_unknown_product(env: Env) -> tuple[Call, Expect]:
    missing = str(uuid.uuid4())
    return get_product(missing), not_found("product", missing)


@CASES.case("adjust-stock-below-zero")
async def adjust_below_zero(env: Env) -> tuple[Call, Expect]:
    product_id = env.product(stock=2)
    call = adjust_stock(env.tokens.admin(), product_id, -3)
    return call, precondition(
        "INSUFFICIENT_STOCK", productId=product_id, requested="3", available="2"
    )


@CASES.case("adjust-stock-delta-zero")
async def adjust_by_zero(env: Env) -> tuple[Call, Expect]:
    return adjust_stock(env.tokens.admin(), env.product(), 0), invalid("delta")


@CASES.case("adjust-stock-unknown-product")
async def adjust_unknown_product(env: Env) -> tuple[Call, Expect]:
    missing = str(uuid.uuid4())
    return adjust_stock(env.tokens.admin(), missing, 1), not_found("product", missing)


@CASES.case("adjust-stock-with-another-products-id-in-the-body", transports=(REST,))
async def adjust_other_product_through_body(env: Env) -> tuple[Call, Expect]:
    call = adjust_stock(env.tokens.admin(), env.product(), 5)
    return _with_body_field(call, "id", env.product()), PATH_OVERRIDDEN_BY_BODY


@CASES.case("adjust-stock-with-another-products-id-in-the-query", transports=(REST,))
async def adjust_other_product_through_query(env: Env) -> tuple[Call, Expect]:
    call = adjust_stock(env.tokens.admin(), env.product(), 5)
    return _with_query(call, "id", env.product()), Expect(code_pb2.INVALID_ARGUMENT)


@CASES.case("adjust-stock-request-id-reused")
async def adjust_request_id_reused(env: Env) -> tuple[Call, Expect]:
    admin, product_id, request_id = env.tokens.admin(), env.product(), str(uuid.uuid4())
    first = adjust_stock(admin, product_id, 1, request_id).request
    assert isinstance(first, catalog_pb2.AdjustStockRequest)
    await env.catalog.AdjustStock(first, metadata=bearer(admin))
    call = adjust_stock(admin, product_id, 2, request_id)
    return call, precondition("REQUEST_ID_REUSED", requestId=request_id)


# Warehouse-managed products: the warehouse counts their stock.


def _warehouse_product(env: Env) -> str:
    product_id = env.product(stock=0)
    with psycopg.connect(env.database_url) as conn:
        conn.execute(
            "UPDATE products SET inventory_source = 'WAREHOUSE' WHERE id = %s", (product_id,)
        )
    return product_id


@CASES.case("adjust-stock-of-a-warehouse-product")
async def adjust_warehouse_product(env: Env) -> tuple[Call, Expect]:
    product_id = _warehouse_product(env)
    call = adjust_stock(env.tokens.admin(), product_id, 5)
    return call, precondition("STOCK_MANAGED_BY_WAREHOUSE", productId=product_id)


@CASES.case("warehouse-product-created-with-stock")
async def warehouse_product_with_stock(env: Env) -> tuple[Call, Expect]:
    product = new_product(stock=5, inventory_source=catalog_pb2.INVENTORY_SOURCE_WAREHOUSE)
    return create_product(env.tokens.admin(), product), invalid("product.stock")


@CASES.case("unknown-inventory-source")
async def unknown_inventory_source(env: Env) -> tuple[Call, Expect]:
    product = new_product(inventory_source=7)
    return create_product(env.tokens.admin(), product), invalid("product.inventory_source")


@CASES.case("update-mask-inventory-source-unset")
async def update_inventory_source_unset(env: Env) -> tuple[Call, Expect]:
    product = catalog_pb2.Product(id=env.product())
    call = update_product(env.tokens.admin(), product, ["inventory_source"])
    return call, invalid("product.inventory_source")


test_bad_input_is_refused_precisely_and_changes_nothing = CASES.test()
