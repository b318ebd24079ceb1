"""CatalogService: translation between protobuf and the catalog use cases."""

from __future__ import annotations

from typing import Any

import grpc

from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from server.api import convert
from server.api.context import current_principal
from server.domain.catalog import new_product, product_changes, stock_adjustment
from server.domain.pagination import page_size
from server.domain.validation import parse_resource_id
from server.services.catalog import Catalog
from server.services.product_cache import GetProduct

Context = grpc.aio.ServicerContext[Any, Any]


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, catalog: Catalog, get_product: GetProduct) -> None:
        self._catalog = catalog
        self._get_product = get_product

    async def ListProducts(
        self, request: catalog_pb2.ListProductsRequest, context: Context
    ) -> catalog_pb2.ListProductsResponse:
        products, next_token = await self._catalog.list_products(
            page_size(request.page_size), request.page_token
        )
        return catalog_pb2.ListProductsResponse(
            products=[convert.product(p) for p in products], next_page_token=next_token
        )

    async def GetProduct(
        self, request: catalog_pb2.GetProductRequest, context: Context
    ) -> catalog_pb2.GetProductResponse:
        product = await self._get_product(parse_resource_id("id", request.id))
        return catalog_pb2.GetProductResponse(product=convert.product(product))

    async def CreateProduct(
        self, request: catalog_pb2.CreateProductRequest, context: Context
    ) -> catalog_pb2.CreateProductResponse:
        given = request.product
        draft = new_product(
            sku=given.sku,
            name=given.name,
            description=given.description,
            price=convert.price_input(given),
            stock=given.stock,
            inventory_source=convert.inventory_source(
                "product.inventory_source", given.inventory_source
            ),
        )
        product = await self._catalog.create_product(draft)
        return catalog_pb2.CreateProductResponse(product=convert.product(product))

    async def UpdateProduct(
        self, request: catalog_pb2.UpdateProductRequest, context: Context
    ) -> catalog_pb2.UpdateProductResponse:
        given = request.product
        product_id = parse_resource_id("product.id", given.id)
        mask = list(request.update_mask.paths) or _populated_fields(given)
        changes = product_changes(
            mask,
            sku=given.sku,
            name=given.name,
            description=given.description,
            price=convert.price_input(given),
            inventory_source=convert.inventory_source(
                "product.inventory_source", given.inventory_source
            ),
        )
        product = await self._catalog.update_product(product_id, changes)
        return catalog_pb2.UpdateProductResponse(product=convert.product(product))

    async def AdjustStock(
        self, request: catalog_pb2.AdjustStockRequest, context: Context
    ) -> catalog_pb2.AdjustStockResponse:
        adjustment = stock_adjustment(request.id, request.delta, request.reason, request.request_id)
        product = await self._catalog.adjust_stock(current_principal().subject, adjustment)
        return catalog_pb2.AdjustStockResponse(product=convert.product(product))


def _populated_fields(product: catalog_pb2.Product) -> list[str]:
    """AIP-134: without an update_mask, every populated field is updated."""
    fields = [name for name in ("sku", "name", "description") if getattr(product, name)]
    if product.HasField("price"):
        fields.append("price")
    if product.inventory_source:
        fields.append("inventory_source")
    if product.stock:
        fields.append("stock")  # refused by the domain with a pointer to AdjustStock
    return fields
