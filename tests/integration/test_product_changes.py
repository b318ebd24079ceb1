"""The product cache against a real PostgreSQL: migration 0004's trigger announces every
committed change to products, whoever makes it, and the listener drops those products;
losing the listener's connection turns the cache off until it is back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from server.db.driver import DriverPool
from server.db.engine import libpq_url
from server.domain.catalog import Product, product_changes
from server.domain.identity import Customer, Principal, Role
from server.domain.orders import cancel_request, order_request
from server.services.catalog import Catalog
from server.services.orders.placement import OrderPlacement
from server.services.product_cache import (
    CHANNEL,
    ProductCache,
    ProductPages,
    follow_product_changes,
)
from tests.conftest import insert_product, notification_queue_held, until
from tests.use_cases import wired

pytestmark = pytest.mark.integration


def _is_local_postgres(pid: int) -> bool:
    try:
        return "postgres" in psutil.Process(pid).name()
    except psutil.Error:
        return False


@dataclass
class Listener:
    connects: int = 0  # connections it opened so far
    queue_usages: list[float] = field(default_factory=list)  # as reported, oldest first


@contextlib.asynccontextmanager
async def listening(
    database_url: str,
    cache: ProductCache,
    name: str = "marketplace-test-listener",
    heartbeat_seconds: float = 5.0,
    warm_from: ProductPages | None = None,
) -> AsyncIterator[Listener]:
    """`follow_product_changes` running in the background for as long as the block."""
    listener = Listener()

    async def connect() -> psycopg.AsyncConnection[Any]:
        listener.connects += 1
        return await psycopg.AsyncConnection.connect(
            libpq_url(database_url), autocommit=True, application_name=name
        )

    task = asyncio.create_task(
        follow_product_changes(
            connect,
            cache,
            warm_from=warm_from,
            heartbeat_seconds=heartbeat_seconds,
            queue_usage=listener.queue_usages.append,
        )
    )
    try:
        yield listener
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def cache(database_url: str) -> AsyncIterator[ProductCache]:
    """A cache whose listener runs in the background, connected and listening."""
    cache = ProductCache(1000)
    async with listening(database_url, cache):
        await until(lambda: cache.enabled, what="cache.enabled")
        yield cache


async def _cached(cache: ProductCache, catalog: Catalog, *product_ids: str) -> None:
    await cache.read_through(catalog.get_products)(list(product_ids))
    assert all(cache.get(p) is not None for p in product_ids)


async def test_a_change_by_any_writer_reaches_the_cache(
    cache: ProductCache, catalog: Catalog, database_url: str
) -> None:
    product_id = insert_product(database_url, stock=5)
    await _cached(cache, catalog, product_id)

    with psycopg.connect(database_url) as conn:  # an operator's SQL, not the server
        conn.execute("UPDATE products SET stock = 6 WHERE id = %s", (product_id,))

    await until(lambda: cache.get(product_id) is None, what="cache.get(product_id) is None")
    assert cache.enabled, "dropped by the notification, not by a reconnect"
    await _cached(cache, catalog, product_id)
    cached = cache.get(product_id)
    assert cached is not None
    assert cached.stock == 6


async def test_an_order_batch_announces_every_product_it_took_stock_from(
    cache: ProductCache,
    catalog: Catalog,
    engine: AsyncEngine,
    hot_path: DriverPool,
    database_url: str,
) -> None:
    # Unaware of the cache (no products_changed): only the notification can drop them.
    orders = OrderPlacement(engine, hot_path)
    taken = [insert_product(database_url, stock=5) for _ in range(3)]
    untouched = insert_product(database_url, stock=5)
    await _cached(cache, catalog, *taken, untouched)

    await orders.place_orders(
        [
            (Customer("alice"), order_request("change-1", [(taken[0], 1), (taken[1], 2)])),
            (Customer("bob"), order_request("change-2", [(taken[2], 1)])),
        ]
    )

    await until(
        lambda: all(cache.get(p) is None for p in taken),
        what="all(cache.get(p) is None for p in taken)",
    )
    assert cache.get(untouched) is not None


async def test_a_statement_changing_hundreds_of_products_is_announced_in_full(
    cache: ProductCache, catalog: Catalog, database_url: str
) -> None:
    # More ids than one NOTIFY payload holds (8,000 bytes: the trigger sends 200 per message).
    product_ids = [insert_product(database_url, stock=1) for _ in range(450)]
    untouched = insert_product(database_url, stock=1)
    await _cached(cache, catalog, *product_ids, untouched)

    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE products SET stock = stock + 1 WHERE id = ANY(%s)", (product_ids,))

    await until(
        lambda: all(cache.get(p) is None for p in product_ids),
        what="all(cache.get(p) is None for p in product_ids)",
    )
    assert cache.get(untouched) is not None, "dropped by the notifications, not by a reconnect"


async def test_a_change_rolled_back_is_not_announced(
    cache: ProductCache, catalog: Catalog, database_url: str
) -> None:
    product_id = insert_product(database_url, stock=5)
    await _cached(cache, catalog, product_id)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE products SET stock = 0 WHERE id = %s", (product_id,))
        conn.rollback()
        # A committed change after it, to know when the rolled-back one would have arrived.
        marker = insert_product(database_url, stock=1)
        await _cached(cache, catalog, marker)
        conn.execute("UPDATE products SET stock = 2 WHERE id = %s", (marker,))
        conn.commit()
    await until(lambda: cache.get(marker) is None, what="cache.get(marker) is None")
    assert cache.get(product_id) is not None


async def test_the_process_that_changes_a_product_forgets_it_before_answering(
    engine: AsyncEngine, hot_path: DriverPool, database_url: str
) -> None:
    cache = ProductCache(100)
    cache.start_caching()  # no listener: only the use cases' own forgetting is at work here
    use_cases = wired(engine, hot_path, products_changed=cache.forget)
    catalog = use_cases.catalog
    product_id = insert_product(database_url, stock=5)

    await _cached(cache, catalog, product_id)
    await catalog.update_product(
        product_id, product_changes(["name"], sku="", name="Renamed", description="", price=None)
    )
    assert cache.get(product_id) is None

    await _cached(cache, catalog, product_id)
    order = await use_cases.placement.place_order(
        "carol", order_request("forget-1", [(product_id, 1)])
    )
    assert cache.get(product_id) is None

    carol = Principal("carol", frozenset({Role.CUSTOMER}))
    await _cached(cache, catalog, product_id)
    await use_cases.cancellation.cancel_order(carol, cancel_request(order.id, ""))
    assert cache.get(product_id) is None, "the cancel gave its stock back"

    await _cached(cache, catalog, product_id)
    await use_cases.cancellation.cancel_order(carol, cancel_request(order.id, ""))
    assert cache.get(product_id) is not None, "cancelled already: no stock moved"


async def test_losing_the_listener_turns_the_cache_off_until_it_is_back(
    catalog: Catalog, database_url: str
) -> None:
    cache = ProductCache(1000)
    name = f"marketplace-test-{uuid.uuid4().hex[:8]}"
    async with listening(database_url, cache, name):
        await until(lambda: cache.enabled, what="cache.enabled")
        await _losing_the_listener(cache, catalog, database_url, name)


async def _losing_the_listener(
    cache: ProductCache, catalog: Catalog, database_url: str, name: str
) -> None:
    product_id = insert_product(database_url, stock=5)
    await _cached(cache, catalog, product_id)

    with psycopg.connect(database_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (name,),
        ).fetchall()
    assert killed == [(True,)]

    # Dropped as the connection went (changes made now would go unheard)...
    await until(lambda: cache.get(product_id) is None, what="cache.get(product_id) is None")
    await until(
        lambda: cache.enabled, what="cache.enabled"
    )  # ...and on again once it listens again
    await _cached(cache, catalog, product_id)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE products SET stock = 9 WHERE id = %s", (product_id,))
    await until(
        lambda: cache.get(product_id) is None, what="cache.get(product_id) is None"
    )  # heard on the new connection


async def test_the_listener_fills_the_cache_once_it_listens(
    catalog: Catalog, database_url: str
) -> None:
    product_ids = [insert_product(database_url, stock=3) for _ in range(5)]
    with psycopg.connect(database_url) as conn:
        total = conn.execute("SELECT count(*) FROM products").fetchone()
    assert total is not None
    cache = ProductCache(total[0] + 10)
    async with listening(database_url, cache, warm_from=catalog.list_products):
        await until(lambda: len(cache) >= total[0], what="len(cache) >= total[0]")
        assert all(cache.get(p) is not None for p in product_ids)


async def test_a_stopped_listener_leaves_no_warming_behind(database_url: str) -> None:
    """At shutdown the pools close once the listener has stopped: a page still being read
    for the cache would be read on a closing pool."""
    reading = asyncio.Event()
    finished = asyncio.Event()

    async def endless_page(page_size: int, page_token: str) -> tuple[list[Product], str]:
        reading.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.2)  # as a query does, it takes a moment to give up
            finished.set()
        raise AssertionError("unreachable")

    cache = ProductCache(10)
    async with listening(database_url, cache, warm_from=endless_page):
        await asyncio.wait_for(reading.wait(), timeout=10)
    assert finished.is_set()


async def test_everything_is_forgotten_when_everything_is_announced(
    cache: ProductCache, catalog: Catalog, database_url: str
) -> None:
    # What TRUNCATE's trigger sends, and the benchmark after it ran pgbench without triggers.
    product_ids = [insert_product(database_url, stock=2) for _ in range(3)]
    await _cached(cache, catalog, *product_ids)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, '*')", (CHANNEL,))
    await until(lambda: len(cache) == 0, what="len(cache) == 0")


async def test_no_cache_while_the_change_triggers_are_disabled(
    catalog: Catalog, database_url: str
) -> None:
    product_id = insert_product(database_url, stock=2)
    cache = ProductCache(100)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE products DISABLE TRIGGER products_updated_notify")
        try:
            async with listening(database_url, cache) as listener:
                # A second connection means the first one was refused after its check.
                await until(lambda: listener.connects >= 2, what="listener.connects >= 2")
                assert not cache.enabled
                await cache.read_through(catalog.get_products)([product_id])
                assert cache.get(product_id) is None

                conn.execute("ALTER TABLE products ENABLE TRIGGER products_updated_notify")
                await until(
                    lambda: cache.enabled, what="cache.enabled"
                )  # the next attempt finds them on
        finally:
            conn.execute("ALTER TABLE products ENABLE TRIGGER products_updated_notify")


async def test_triggers_disabled_while_listening_turn_the_cache_off(
    catalog: Catalog, database_url: str
) -> None:
    cache = ProductCache(100)
    async with listening(database_url, cache, heartbeat_seconds=1.0):
        await until(lambda: cache.enabled, what="cache.enabled")
        product_id = insert_product(database_url, stock=2)
        await _cached(cache, catalog, product_id)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE products DISABLE TRIGGER products_updated_notify")
            try:
                # Changes made now go unheard: the next heartbeat turns the cache off.
                await until(lambda: not cache.enabled, what="not cache.enabled")
                assert cache.get(product_id) is None
            finally:
                conn.execute("ALTER TABLE products ENABLE TRIGGER products_updated_notify")
        await until(lambda: cache.enabled, what="cache.enabled", within=20)


async def test_a_listener_whose_backend_stops_answering_turns_the_cache_off(
    catalog: Catalog, database_url: str
) -> None:
    """A partitioned database host sends no FIN: the heartbeat is what notices. Played by
    stopping the listener's PostgreSQL backend (SIGSTOP), so its socket stays open, until
    the listener is back on a new connection."""
    cache = ProductCache(100)
    name = f"marketplace-test-{uuid.uuid4().hex[:8]}"
    async with listening(database_url, cache, name, heartbeat_seconds=2.0):
        await until(lambda: cache.enabled, what="cache.enabled")
        product_id = insert_product(database_url, stock=2)
        await _cached(cache, catalog, product_id)
        stopped = _listener_backend(database_url, name)
        if not _is_local_postgres(stopped):
            pytest.skip("the database's processes are not on this machine")
        os.kill(stopped, signal.SIGSTOP)
        try:
            await until(lambda: not cache.enabled, what="not cache.enabled")
            assert cache.get(product_id) is None
            await until(lambda: cache.enabled, what="cache.enabled", within=30)
            assert _listener_backend(database_url, name) != stopped
        finally:
            os.kill(stopped, signal.SIGCONT)


def _listener_backend(database_url: str, name: str) -> int:
    """The pid of the newest backend serving the listener named `name`."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()"
            " ORDER BY backend_start DESC LIMIT 1",
            (name,),
        ).fetchone()
    assert row is not None
    pid: int = row[0]
    return pid


async def test_the_listener_reports_a_notification_queue_held_by_a_stalled_listener(
    database_url: str,
) -> None:
    cache = ProductCache(100)
    async with listening(database_url, cache, heartbeat_seconds=1.0) as listener:
        await until(lambda: bool(listener.queue_usages), what="a first queue usage")
        assert all(0.0 <= usage < 0.01 for usage in listener.queue_usages)
        with notification_queue_held(database_url):
            reported = len(listener.queue_usages)
            await until(
                lambda: len(listener.queue_usages) > reported + 1,
                what="two more heartbeats",
                within=10,
            )
            assert listener.queue_usages[-1] > 0.0
