"""Catalog use cases: products, prices and stock."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from psycopg.rows import namedtuple_row
from sqlalchemy import Row, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.db.driver import DriverPool, psycopg_sql
from server.db.engine import autocommit_reads
from server.db.replica import ReadOnReplica, ReadRoute, same_origin
from server.db.transactions import UNIQUE_VIOLATION, in_transaction, sqlstate
from server.domain.catalog import (
    Product,
    ProductChanges,
    ProductDraft,
    StockAdjustment,
)
from server.domain.errors import (
    AlreadyExists,
    ErrorReason,
    FailedPrecondition,
    NotFound,
    PreconditionViolation,
    check_replay,
)
from server.domain.inventory import SKU_PATTERN, InventorySource, stock_managed_by_warehouse
from server.domain.pagination import decode_page_token, encode_page_token, invalid_page_token
from server.events.builders import PRODUCT_CREATED_SEQUENCE, StockChangeCause, stock_changed
from server.events.outbox import Outbox
from server.services.product_cache import ProductsChanged, no_cache
from server.services.rows import PRODUCT_COLUMNS, product_from_row
from server.services.warehouse import recount_warehouse_stock

_LIST_PRODUCTS = text(
    f"SELECT {PRODUCT_COLUMNS} FROM products WHERE sku > :after ORDER BY sku LIMIT :limit"
)
_GET_PRODUCT = text(f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = :id")
_GET_PRODUCTS = text(f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = ANY(CAST(:ids AS uuid[]))")
# The hottest read: on psycopg directly (server/db/driver.py).
_GET_PRODUCTS_SQL = psycopg_sql(
    f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = ANY(CAST(:ids AS uuid[]))"
)
_INSERT_PRODUCT = text(
    f"""
    INSERT INTO products (id, sku, name, description, price_currency, price_amount, stock,
                          inventory_source, create_time, update_time, event_sequence)
    VALUES (:id, :sku, :name, :description, :currency, :amount, :stock, :inventory_source,
            now(), now(), :event_sequence)
    RETURNING {PRODUCT_COLUMNS}
    """
)
_UPDATE_PRODUCT = text(
    f"""
    UPDATE products
       SET sku = :sku, name = :name, description = :description,
           price_currency = :currency, price_amount = :amount,
           inventory_source = :inventory_source, update_time = now()
     WHERE id = :id
    RETURNING {PRODUCT_COLUMNS}
    """
)
_LOCK_PRODUCT = text(f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = :id FOR UPDATE")
# Claims the request_id first: a concurrent retry waits here on the unique key and then
# finds the first attempt's row, so stock moves once however many copies arrive.
_CLAIM_ADJUSTMENT = text(
    """
    INSERT INTO stock_adjustments (id, product_id, actor, request_id, request_fingerprint,
                                   delta, reason, create_time)
    SELECT :id, p.id, :actor, :request_id, :fingerprint, :delta, :reason, now()
      FROM products p WHERE p.id = :product_id
    ON CONFLICT (actor, request_id) DO NOTHING
    RETURNING id
    """
)
_FIND_ADJUSTMENT = text(
    "SELECT product_id, request_fingerprint FROM stock_adjustments"
    " WHERE actor = :actor AND request_id = :request_id"
)
_APPLY_ADJUSTMENT = text(
    f"""
    UPDATE products SET stock = stock + :delta, update_time = now(),
                        event_sequence = event_sequence + 1
     WHERE id = :id AND stock + :delta >= 0 AND inventory_source = 'MANAGED_HERE'
    RETURNING {PRODUCT_COLUMNS}, event_sequence
    """
)


class Catalog:
    def __init__(
        self,
        engine: AsyncEngine,
        hot_path: DriverPool,
        *,
        products_changed: ProductsChanged = no_cache,
        outbox: Outbox | None = None,
    ) -> None:
        self._engine = engine
        self._hot_path = hot_path
        self._products_changed = products_changed
        self._outbox = outbox or Outbox()
        self._reads = ReadRoute(autocommit_reads(engine))

    def read_from_replica(self, replica: AsyncEngine) -> None:
        """ListProducts and GetProduct misses on a streaming replica (server/db/replica.py);
        writes stay here."""
        self._reads = ReadRoute(autocommit_reads(self._engine), autocommit_reads(replica))

    async def list_products(self, page_size: int, page_token: str) -> tuple[list[Product], str]:
        position = decode_page_token(page_token, kind="products", scope="*")
        after = position.get("sku") if position else ""
        if not isinstance(after, str) or (after and not SKU_PATTERN.fullmatch(after)):
            raise invalid_page_token()

        async def page(conn: AsyncConnection) -> Sequence[Row[Any]]:
            result = await conn.execute(_LIST_PRODUCTS, {"after": after, "limit": page_size + 1})
            return result.all()

        rows = await self._reads.read(page)
        products = same_origin(rows, (product_from_row(row) for row in rows[:page_size]))
        next_token = ""
        if len(rows) > page_size:
            next_token = encode_page_token("products", "*", {"sku": products[-1].sku})
        return products, next_token

    async def get_product(self, product_id: str) -> Product:
        [found] = await self.get_products([product_id])
        if isinstance(found, NotFound):
            raise found
        return found

    async def get_products(self, product_ids: Sequence[str]) -> list[Product | NotFound]:
        """Several lookups in one query: concurrent GetProduct calls share it (see app.py).
        On the replica when there is one; a ReadOnReplica then."""
        wanted = sorted({uuid.UUID(p) for p in product_ids})

        async def on_replica(conn: AsyncConnection) -> Sequence[Any]:
            return (await conn.execute(_GET_PRODUCTS, {"ids": wanted})).all()

        rows = await self._reads.read(
            on_replica, on_primary=lambda: self._products_on_primary(wanted)
        )
        found = {product.id: product for product in map(product_from_row, rows)}
        missing = [p for p in wanted if str(p) not in found]
        if missing and isinstance(rows, ReadOnReplica):
            # Perhaps created after the replica's last replay: NOT_FOUND on the primary's word.
            for row in await self._products_on_primary(missing):
                product = product_from_row(row)
                found[product.id] = product
        return same_origin(rows, (found.get(p) or NotFound("product", p) for p in product_ids))

    async def _products_on_primary(self, wanted: list[uuid.UUID]) -> Sequence[Any]:
        async with self._hot_path.connection() as driver:
            lookup = await driver.execute_reusing_cursor(
                _GET_PRODUCTS_SQL, {"ids": wanted}, row_factory=namedtuple_row
            )
            return await lookup.fetchall()

    async def create_product(self, draft: ProductDraft) -> Product:
        """Creates the product; its initial stock, even none, is its first stock_changed."""
        params = {
            "id": uuid.uuid4(),
            "sku": draft.sku,
            "name": draft.name,
            "description": draft.description,
            "currency": draft.price.currency,
            "amount": draft.price.amount,
            "stock": draft.stock,
            "inventory_source": draft.inventory_source.value,
            "event_sequence": PRODUCT_CREATED_SEQUENCE,
        }
        try:
            async with self._engine.begin() as conn:
                product = product_from_row((await conn.execute(_INSERT_PRODUCT, params)).one())
                created = stock_changed(
                    product_id=product.id,
                    sku=product.sku,
                    stock=product.stock,
                    delta=product.stock,
                    cause=StockChangeCause.PRODUCT_CREATED,
                    sequence=PRODUCT_CREATED_SEQUENCE,
                    occur_time=product.create_time,
                )
                await self._outbox.append(conn, [created])
        except IntegrityError as error:
            raise _sku_taken(error, draft.sku) from None
        self._reads.wrote()
        return product

    async def update_product(self, product_id: str, changes: ProductChanges) -> Product:
        try:
            updated = await in_transaction(
                self._engine, lambda conn: self._update_locked(conn, product_id, changes)
            )
        except IntegrityError as error:
            raise _sku_taken(error, changes.sku or "") from None
        self._reads.wrote()
        self._products_changed([product_id])
        return updated

    async def _update_locked(
        self, conn: AsyncConnection, product_id: str, changes: ProductChanges
    ) -> Product:
        row = (await conn.execute(_LOCK_PRODUCT, {"id": uuid.UUID(product_id)})).first()
        if row is None:
            raise NotFound("product", product_id)
        current = product_from_row(row)
        updated = changes.apply_to(current)
        params: dict[str, Any] = {
            "id": uuid.UUID(product_id),
            "sku": updated.sku,
            "name": updated.name,
            "description": updated.description,
            "currency": updated.price.currency,
            "amount": updated.price.amount,
            "inventory_source": updated.inventory_source.value,
        }
        saved = product_from_row((await conn.execute(_UPDATE_PRODUCT, params)).one())
        if (
            saved.inventory_source is InventorySource.WAREHOUSE
            and current.inventory_source is not InventorySource.WAREHOUSE
        ):
            # From now on the warehouse's levels decide its stock (back to MANAGED_HERE,
            # the stock stays what it was, for AdjustStock to move).
            changes_made = await recount_warehouse_stock(conn, [uuid.UUID(product_id)])
            await self._outbox.append(
                conn, [change.event(StockChangeCause.WAREHOUSE_LEVEL) for change in changes_made]
            )
            if changes_made:
                saved = product_from_row(
                    (await conn.execute(_GET_PRODUCT, {"id": uuid.UUID(product_id)})).one()
                )
        return saved

    async def adjust_stock(self, actor: str, adjustment: StockAdjustment) -> Product:
        adjusted = await in_transaction(
            self._engine, lambda conn: self._adjust_stock_once(conn, actor, adjustment)
        )
        self._reads.wrote()
        self._products_changed([adjustment.product_id])
        return adjusted

    async def _adjust_stock_once(
        self, conn: AsyncConnection, actor: str, adjustment: StockAdjustment
    ) -> Product:
        product_id = uuid.UUID(adjustment.product_id)
        claimed = await conn.execute(
            _CLAIM_ADJUSTMENT,
            {
                "id": uuid.uuid4(),
                "product_id": product_id,
                "actor": actor,
                "request_id": adjustment.request_id,
                "fingerprint": adjustment.fingerprint(),
                "delta": adjustment.delta,
                "reason": adjustment.reason,
            },
        )
        adjustment_id = claimed.scalar()
        if adjustment_id is None:
            previous = (
                await conn.execute(
                    _FIND_ADJUSTMENT, {"actor": actor, "request_id": adjustment.request_id}
                )
            ).first()
            if previous is None:
                raise NotFound("product", adjustment.product_id)
            check_replay(
                adjustment.request_id, previous.request_fingerprint, adjustment.fingerprint()
            )
            row = (await conn.execute(_GET_PRODUCT, {"id": product_id})).one()
            return product_from_row(row)
        applied = (
            await conn.execute(_APPLY_ADJUSTMENT, {"id": product_id, "delta": adjustment.delta})
        ).first()
        if applied is None:
            current = product_from_row((await conn.execute(_GET_PRODUCT, {"id": product_id})).one())
            if current.inventory_source is InventorySource.WAREHOUSE:
                raise stock_managed_by_warehouse(adjustment.product_id)
            raise FailedPrecondition(
                f"removing {-adjustment.delta} units would take stock below zero",
                reason=ErrorReason.INSUFFICIENT_STOCK,
                metadata={
                    "productId": adjustment.product_id,
                    "requested": str(-adjustment.delta),
                    "available": str(current.stock),
                },
                violations=[
                    PreconditionViolation(
                        ErrorReason.INSUFFICIENT_STOCK,
                        f"products/{adjustment.product_id}",
                        f"stock is {current.stock}",
                    )
                ],
            )
        adjusted = product_from_row(applied)
        event = stock_changed(
            product_id=adjusted.id,
            sku=adjusted.sku,
            stock=adjusted.stock,
            delta=adjustment.delta,
            cause=StockChangeCause.ADJUSTED,
            sequence=applied.event_sequence,
            occur_time=adjusted.update_time,
            adjustment_id=str(adjustment_id),
        )
        await self._outbox.append(conn, [event])
        return adjusted


def _sku_taken(error: IntegrityError, sku: str) -> Exception:
    if sqlstate(error) == UNIQUE_VIOLATION:
        return AlreadyExists("product", sku, f"a product with sku {sku!r} already exists")
    return error
