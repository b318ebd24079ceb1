"""ListProducts and GetProduct misses on a real streaming replica (devstack's, from the
pgserver binaries): they read there, a writer reads its own writes from the primary, a
product missing on the replica is looked up on the primary, the product cache stores a
replica's row only when it is as new as every change heard, and a stopped replica sends
reads back to the primary without a failed call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devstack.postgres import EmbeddedPostgres, StreamingReplica
from server.db.engine import libpq_url, upgrade_schema
from server.domain.catalog import Product, ProductDraft
from server.domain.errors import NotFound
from server.domain.money import Money
from server.services.catalog import Catalog
from server.services.product_cache import ProductCache, follow_product_changes
from tests.conftest import eventually, hot_path_pool, insert_product, sqlalchemy_engine, until


@dataclass
class Pair:
    primary: EmbeddedPostgres
    replica: StreamingReplica


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with tempfile.TemporaryDirectory(prefix="marketplace-replica-") as scratch:
        # pgserver's account (when we are root) must reach both data folders.
        os.chmod(scratch, 0o755)  # noqa: S103  # a test folder, removed at the end
        with EmbeddedPostgres(Path(scratch) / "primary") as primary:
            upgrade_schema(primary.url)
            replica = StreamingReplica(primary, Path(scratch) / "replica")
            try:
                yield Pair(primary, replica)
            finally:
                replica.close()


@pytest.fixture
async def catalog(pair: Pair) -> AsyncIterator[Catalog]:
    if not _answers(pair.replica.url):
        pair.replica.start()
    engine = sqlalchemy_engine(pair.primary.url, pool_size=2)
    replica = sqlalchemy_engine(pair.replica.url, pool_size=2)
    async with hot_path_pool(pair.primary.url, size=1) as hot_path:
        catalog = Catalog(engine, hot_path)
        catalog.read_from_replica(replica)
        yield catalog
    await engine.dispose()
    await replica.dispose()


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def _replay(replica_url: str, *, paused: bool) -> None:
    with psycopg.connect(replica_url, autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()" if paused else "SELECT pg_wal_replay_resume()")


async def _listed(catalog: Catalog) -> set[str]:
    products, _ = await catalog.list_products(1000, "")
    return {product.id for product in products}


async def test_reads_go_to_the_replica_and_writers_read_their_writes(
    pair: Pair, catalog: Catalog
) -> None:
    seen_first = insert_product(pair.primary.url, stock=1)

    async def replicated() -> bool:
        return seen_first in await _listed(catalog)

    await eventually(replicated, within=30, what="the replica replaying the first product")
    _replay(pair.replica.url, paused=True)
    try:
        # Written behind this process's back while the replica replays nothing: unseen,
        # which shows the read went to the replica.
        unseen = insert_product(pair.primary.url, stock=1)
        assert unseen not in await _listed(catalog)
        # Written through the catalog: the writer's next read is the primary's.
        mine = await catalog.create_product(
            ProductDraft(
                sku=f"REPLICA-{uuid.uuid4().hex[:8].upper()}",
                name="Read your writes",
                description="",
                price=Money("USD", Decimal("1.00")),
                stock=3,
            )
        )
        assert {mine.id, unseen} <= await _listed(catalog)
    finally:
        _replay(pair.replica.url, paused=False)


async def test_a_stopped_replica_sends_reads_to_the_primary_without_a_failed_call(
    pair: Pair, catalog: Catalog
) -> None:
    before = insert_product(pair.primary.url, stock=1)

    async def replicated() -> bool:
        return before in await _listed(catalog)

    await eventually(replicated, within=30, what="the replica replaying the product")
    pair.replica.stop()
    try:
        after = insert_product(pair.primary.url, stock=1)
        for _ in range(20):
            assert {before, after} <= await _listed(catalog)
    finally:
        pair.replica.start()


def _rename(database_url: str, product_id: str, name: str) -> None:
    """Behind the catalog's back (no own-writes window), as another process's write."""
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE products SET name = %s WHERE id = %s", (name, product_id))


@contextlib.asynccontextmanager
async def _listening(database_url: str, cache: ProductCache) -> AsyncIterator[None]:
    """The cache's listener on the primary, its heartbeat (and WAL position) every 0.2 s."""

    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(libpq_url(database_url), autocommit=True)

    task = asyncio.create_task(follow_product_changes(connect, cache, heartbeat_seconds=0.2))
    try:
        await until(lambda: cache.enabled, what="the listener listening")
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_product_miss_reads_the_replica_whose_rows_are_kept_only_when_fresh(
    pair: Pair, catalog: Catalog
) -> None:
    product_id = insert_product(pair.primary.url, stock=1)
    cache = ProductCache(100)
    fetch = cache.read_through(catalog.get_products)

    async def kept(name: str | None = None) -> bool:
        await fetch([product_id])
        product = cache.get(product_id)
        return product is not None and name in (None, product.name)

    async with _listening(pair.primary.url, cache):
        # Replayed past the primary's last sampled position: the replica's row is kept.
        await eventually(kept, within=30, what="a replica row stored")
        _replay(pair.replica.url, paused=True)
        try:
            _rename(pair.primary.url, product_id, "Renamed on the primary")
            await until(lambda: cache.get(product_id) is None, what="the rename heard")
            await asyncio.sleep(0.5)  # heartbeats: positions sampled after the rename
            [product] = await fetch([product_id])
            # The replica's (not yet replayed) row answered, so the read went there...
            assert isinstance(product, Product)
            assert product.name != "Renamed on the primary"
            # ...and is not kept: the replica is behind a change already heard.
            assert cache.get(product_id) is None
        finally:
            _replay(pair.replica.url, paused=False)
        await eventually(
            lambda: kept("Renamed on the primary"), within=30, what="the renamed row stored"
        )


async def test_a_product_just_created_is_found_though_the_replica_lags(
    pair: Pair, catalog: Catalog
) -> None:
    _replay(pair.replica.url, paused=True)
    try:
        created = insert_product(pair.primary.url, stock=2)  # by another process, say
        found = await catalog.get_product(created)
        assert found.id == created
        [missing] = await catalog.get_products([str(uuid.uuid4())])
        assert isinstance(missing, NotFound)
    finally:
        _replay(pair.replica.url, paused=False)


async def test_a_replica_stopped_under_product_misses_costs_no_failed_call(
    pair: Pair, catalog: Catalog
) -> None:
    product_ids = [insert_product(pair.primary.url, stock=1) for _ in range(5)]

    async def replicated() -> bool:
        return set(product_ids) <= await _listed(catalog)

    await eventually(replicated, within=30, what="the replica replaying the products")

    async def misses(rounds: int) -> None:
        for _ in range(rounds):
            found = await catalog.get_products(product_ids)
            assert [p.id for p in found if isinstance(p, Product)] == product_ids
            await asyncio.sleep(0.005)

    load = [asyncio.create_task(misses(100)) for _ in range(4)]
    await asyncio.sleep(0.1)
    pair.replica.stop()  # mid-load
    try:
        await asyncio.gather(*load)
    finally:
        pair.replica.start()
