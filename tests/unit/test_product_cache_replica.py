"""The product cache's rule for rows a read replica answered, without a database: kept only
when the replica had replayed past the primary's last sampled WAL position and the product
has not changed since that sample."""

from __future__ import annotations

from collections.abc import Sequence

from server.db.replica import ReadOnReplica
from server.domain.catalog import Product
from server.domain.errors import NotFound
from server.services.product_cache import FetchProducts, ProductCache
from tests.unit.test_product_cache import product


def replica(replayed_lsn: int | None, *products: Product) -> FetchProducts:
    """A replica that had replayed up to `replayed_lsn` and holds `products`."""

    async def fetch(product_ids: Sequence[str]) -> ReadOnReplica[Product | NotFound]:
        rows = {p.id: p for p in products}
        return ReadOnReplica(
            (rows.get(p) or NotFound("product", p) for p in product_ids), replayed_lsn
        )

    return fetch


def sampled_cache(lsn: int = 100) -> ProductCache:
    cache = ProductCache(10)
    cache.start_caching()
    cache.primary_position(lsn, as_of=cache.generation)
    return cache


async def test_a_replica_past_the_sample_is_kept_one_behind_it_is_only_answered() -> None:
    cache = sampled_cache(lsn=100)
    [behind] = await cache.read_through(replica(99, product("a")))(["a"])
    assert behind == product("a")
    assert cache.get("a") is None
    await cache.read_through(replica(100, product("a")))(["a"])
    assert cache.get("a") == product("a")


async def test_a_product_changed_since_the_sample_is_not_kept_until_the_next_one() -> None:
    cache = sampled_cache(lsn=100)
    asked_at = cache.generation
    cache.forget(["a"])  # heard after the position was asked for
    await cache.read_through(replica(500, product("a"), product("b")))(["a", "b"])
    assert cache.get("a") is None
    assert cache.get("b") == product("b")
    cache.primary_position(120, as_of=asked_at)  # asked before the change: still not
    await cache.read_through(replica(500, product("a")))(["a"])
    assert cache.get("a") is None
    cache.primary_position(130, as_of=cache.generation)
    await cache.read_through(replica(500, product("a")))(["a"])
    assert cache.get("a") == product("a")


async def test_no_sample_or_a_change_to_everything_keeps_nothing_from_the_replica() -> None:
    cache = ProductCache(10)
    cache.start_caching()  # listening, no position sampled yet
    await cache.read_through(replica(500, product("a")))(["a"])
    assert cache.get("a") is None
    cache = sampled_cache()
    cache.forget_everything()
    await cache.read_through(replica(500, product("a")))(["a"])
    assert cache.get("a") is None
    cache = sampled_cache()
    cache.stop_caching()
    cache.start_caching()
    await cache.read_through(replica(500, product("a")))(["a"])
    assert cache.get("a") is None
