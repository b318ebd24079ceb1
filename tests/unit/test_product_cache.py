"""The product cache's rules, without a database: what it stores, when it must not, and
what it forgets. The fetches are stand-ins the test holds back, so a change can be made to
arrive in the middle of one."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

from server.domain.catalog import Product
from server.domain.errors import NotFound
from server.domain.money import Money
from server.services.product_cache import ProductCache, served_from

MOMENT = datetime(2026, 12, 1, tzinfo=UTC)


def product(product_id: str, stock: int = 5) -> Product:
    return Product(
        id=product_id,
        sku=f"SKU-{product_id}",
        name=product_id,
        description="",
        price=Money("USD", Decimal("2.50")),
        stock=stock,
        create_time=MOMENT,
        update_time=MOMENT,
    )


class Database:
    """Products by id; `hold` makes the next fetch wait until `release` is set, after
    reading (as a real query reads its snapshot before the answer arrives)."""

    def __init__(self, *products: Product) -> None:
        self.rows = {p.id: p for p in products}
        self.fetched: list[list[str]] = []
        self.hold = False
        self.release = asyncio.Event()

    async def fetch(self, product_ids: Sequence[str]) -> list[Product | NotFound]:
        self.fetched.append(list(product_ids))
        found = [self.rows.get(p) or NotFound("product", p) for p in product_ids]
        if self.hold:
            await self.release.wait()
        return found


def listening_cache(capacity: int = 10) -> ProductCache:
    cache = ProductCache(capacity)
    cache.start_caching()
    return cache


async def test_a_read_is_stored_and_served_until_the_product_changes() -> None:
    database = Database(product("a"))
    cache = listening_cache()
    fetch = cache.read_through(database.fetch)

    assert await fetch(["a"]) == [product("a")]
    assert cache.get("a") == product("a")

    cache.forget(["a"])
    assert cache.get("a") is None


async def test_unknown_products_are_not_stored() -> None:
    cache = listening_cache()
    [missing] = await cache.read_through(Database().fetch)(["nope"])
    assert isinstance(missing, NotFound)
    assert len(cache) == 0


async def test_a_change_heard_during_a_read_keeps_that_read_out() -> None:
    database = Database(product("a", stock=5), product("b", stock=7))
    cache = listening_cache()
    database.hold = True
    reading = asyncio.ensure_future(cache.read_through(database.fetch)(["a", "b"]))
    await asyncio.sleep(0)  # the read has seen stock 5 for "a"
    database.rows["a"] = product("a", stock=4)
    cache.forget(["a"])  # the notification arrives before the read's answer
    database.release.set()
    await reading

    assert cache.get("a") is None, "the read may have seen a's old row"
    assert cache.get("b") == product("b", stock=7), "b did not change"


async def test_nothing_is_stored_while_the_listener_is_down() -> None:
    database = Database(product("a"))
    cache = ProductCache(10)  # never heard from the listener
    await cache.read_through(database.fetch)(["a"])
    assert cache.get("a") is None

    cache.start_caching()
    await cache.read_through(database.fetch)(["a"])
    assert cache.get("a") == product("a")

    cache.stop_caching()
    assert cache.get("a") is None, "changes may go unheard: everything cached goes"
    await cache.read_through(database.fetch)(["a"])
    assert cache.get("a") is None


async def test_a_read_started_before_the_listener_reconnected_is_not_stored() -> None:
    database = Database(product("a"))
    cache = listening_cache()
    database.hold = True
    reading = asyncio.ensure_future(cache.read_through(database.fetch)(["a"]))
    await asyncio.sleep(0)
    cache.stop_caching()  # a change made now is never heard...
    cache.start_caching()  # ...and the listener is back before the read answers
    database.release.set()
    await reading
    assert cache.get("a") is None


async def test_the_least_recently_used_product_goes_first() -> None:
    database = Database(*(product(name) for name in "abc"))
    cache = listening_cache(capacity=2)
    fetch = cache.read_through(database.fetch)
    await fetch(["a"])
    await fetch(["b"])
    assert cache.get("a") is not None  # a is now the more recently used
    await fetch(["c"])
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (product("a"), None, product("c"))


async def test_capacity_zero_caches_nothing() -> None:
    cache = listening_cache(capacity=0)
    await cache.read_through(Database(product("a")).fetch)(["a"])
    assert not cache.enabled
    assert cache.get("a") is None


async def test_lookups_go_to_the_database_only_on_a_miss() -> None:
    database = Database(product("a"))
    cache = listening_cache()
    fetch = cache.read_through(database.fetch)
    counts = {"hit": 0, "miss": 0}

    async def lookup(product_id: str) -> Product:
        [found] = await fetch([product_id])
        if isinstance(found, NotFound):
            raise found
        return found

    get_product = served_from(
        cache,
        lookup,
        hit=lambda: counts.__setitem__("hit", counts["hit"] + 1),
        miss=lambda: counts.__setitem__("miss", counts["miss"] + 1),
    )
    assert await get_product("a") == product("a")
    assert await get_product("a") == product("a")
    database.rows["a"] = dataclasses.replace(product("a"), stock=1)
    cache.forget(["a"])
    assert (await get_product("a")).stock == 1

    assert database.fetched == [["a"], ["a"]]
    assert counts == {"hit": 1, "miss": 2}


class Pages:
    """The catalog in id order, a page at a time (its page token: the last id sent);
    `hold` holds back the next page's answer."""

    def __init__(self, *products: Product) -> None:
        self.rows = sorted(products, key=lambda p: p.id)
        self.hold = False
        self.release = asyncio.Event()
        self.asked: list[tuple[int, str]] = []

    async def page(self, size: int, token: str) -> tuple[list[Product], str]:
        self.asked.append((size, token))
        after = [p for p in self.rows if not token or p.id > token]
        found = after[:size]
        if self.hold:
            await self.release.wait()
        return found, found[-1].id if len(after) > size else ""


async def test_warming_reads_page_after_page_up_to_the_capacity() -> None:
    pages = Pages(*(product(name) for name in "abcdefg"))
    cache = listening_cache(capacity=5)
    assert await cache.warm(pages.page, page_size=2) == 5
    assert pages.asked == [(2, ""), (2, "b"), (1, "d")]
    assert [cache.get(name) is not None for name in "abcdefg"] == [True] * 5 + [False] * 2


async def test_warming_stops_at_the_last_page() -> None:
    pages = Pages(product("a"), product("b"), product("c"))
    cache = listening_cache(capacity=100)
    assert await cache.warm(pages.page, page_size=2) == 3
    assert pages.asked == [(2, ""), (2, "b")]


async def test_warming_keeps_out_a_product_changed_while_its_page_was_read() -> None:
    pages = Pages(product("a"), product("b"))
    cache = listening_cache()
    pages.hold = True
    warming = asyncio.ensure_future(cache.warm(pages.page))
    await asyncio.sleep(0)
    cache.forget(["b"])
    pages.release.set()
    await warming
    assert (cache.get("a"), cache.get("b")) == (product("a"), None)


async def test_warming_stops_when_the_listener_is_lost() -> None:
    pages = Pages(product("a"), product("b"), product("c"))
    cache = listening_cache()
    pages.hold = True
    warming = asyncio.ensure_future(cache.warm(pages.page, page_size=1))
    await asyncio.sleep(0)
    cache.stop_caching()
    pages.release.set()
    assert await warming == 1
    assert len(cache) == 0


async def test_forgetting_everything_drops_every_product_and_every_read_in_flight() -> None:
    database = Database(product("a"), product("b"))
    cache = listening_cache()
    await cache.read_through(database.fetch)(["a"])
    database.hold = True
    reading = asyncio.ensure_future(cache.read_through(database.fetch)(["b"]))
    await asyncio.sleep(0)
    cache.forget_everything()
    database.release.set()
    await reading
    assert (cache.get("a"), cache.get("b")) == (None, None)
    assert cache.enabled, "still listening: later reads are stored again"
    await cache.read_through(database.fetch)(["b"])
    assert cache.get("b") == product("b")


def test_the_cache_reports_turning_on_and_off() -> None:
    reported: list[bool] = []
    cache = ProductCache(10, on_listening=reported.append)
    cache.start_caching()
    cache.stop_caching()
    cache.start_caching()
    assert reported == [True, False, True]
