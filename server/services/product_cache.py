"""Products in memory for GetProduct, dropped the moment PostgreSQL says they changed.

GetProduct is the marketplace's most frequent call (every product page, and under a flash
sale thousands of viewers of one product). Read from the database, each call costs a round
trip, whose CPU on both sides is more than the whole rest of the call (docs/benchmarks.md).
From memory it costs neither.

Staying current: a trigger on `products` (migration 0004) sends a NOTIFY with the ids of
every committed change, whoever made it (orders, AdjustStock, UpdateProduct, expiry,
refunds, an operator's SQL). Each server process LISTENs on one connection of its own
(`follow_product_changes`) and drops those ids. The process that made a change also drops
the ids itself before answering (`forget`), so its caller reads its own write back at once;
another process may serve the old product until the notification arrives, about a
millisecond after the commit. While that connection is down nothing is cached at all (a
change could go unheard), so an outage turns the cache off rather than stale.

With a read replica (server/db/replica.py) misses and warming read there. A notification
reaches the listener before the replica has necessarily replayed its change, and none comes
again, so a replica's row is stored only when provably as new as every change heard: the
listener samples the primary's WAL position at each heartbeat, and a row is kept when the
replica had replayed past the last sample and its product has not changed since then.

The order transaction never reads this cache: stock is decided on locked rows.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from server.db.replica import ReadOnReplica
from server.domain.catalog import Product
from server.domain.errors import NotFound

# The channel migration 0004's triggers notify. Payload: comma-separated product ids, or
# EVERYTHING (TRUNCATE, or a bulk change announced by hand).
CHANNEL = "marketplace_product_changes"
EVERYTHING = "*"

FetchProducts = Callable[[Sequence[str]], Awaitable[Sequence[Product | NotFound]]]
Read = TypeVar("Read")
# A page of the catalog: (page size, page token) -> (products, next page token or "").
ProductPages = Callable[[int, str], Awaitable[tuple[Sequence[Product], str]]]
# Looks up one product (GetProduct): in the server, from the cache, else by a batched query.
GetProduct = Callable[[str], Awaitable[Product]]
# What a use case calls after committing a change to these products (ProductCache.forget).
ProductsChanged = Callable[[Collection[str]], None]

_CONNECTION_ERRORS = (psycopg.Error, OSError, TimeoutError)

_log = structlog.get_logger("marketplace.product_cache")


@dataclass(frozen=True, slots=True)
class _PrimaryPosition:
    """The primary's WAL position, read after every change heard up to generation `as_of`
    (so each of those changes committed before it)."""

    as_of: int
    lsn: int


@dataclass(frozen=True, slots=True)
class _Fetch:
    """When a database read for the cache started, to tell whether it may be stored."""

    generation: int
    epoch: int


class ProductCache:
    """At most `capacity` products by id, least recently used dropped first. Plain Python:
    the listener and the lookups call it from one event loop."""

    def __init__(
        self, capacity: int, *, on_listening: Callable[[bool], None] = lambda listening: None
    ) -> None:
        """`on_listening` is told each time the cache turns on (True) or off (False)."""
        self._capacity = capacity
        self._on_listening = on_listening
        self._products: OrderedDict[str, Product] = OrderedDict()
        self._caching = False
        self._epoch = 0  # counts (re)connections of the listener
        self._generation = 0  # counts calls of forget()
        self._fetches = 0  # database reads in flight
        # While reads are in flight: the generation at which each id was last forgotten. A
        # read that started before it may have seen the old row and must not store it.
        self._forgotten_at: dict[str, int] = {}
        # For rows read on a replica: the last sample of the primary's position, the
        # generation of each change heard since it, and of the last change to everything.
        self._primary: _PrimaryPosition | None = None
        self._changed_at: dict[str, int] = {}
        self._everything_at = 0

    @property
    def enabled(self) -> bool:
        return self._caching and self._capacity > 0

    @property
    def generation(self) -> int:
        """Counts the changes heard; see primary_position()."""
        return self._generation

    def __len__(self) -> int:
        return len(self._products)

    def get(self, product_id: str) -> Product | None:
        product = self._products.get(product_id)
        if product is not None:
            self._products.move_to_end(product_id)
        return product

    def forget(self, product_ids: Collection[str]) -> None:
        """These products changed (a notification, or this process's own commit)."""
        self._generation += 1
        if len(self._changed_at) > self._capacity:
            self._everything_changed()  # bounded: while samples are missing (no listener)
        for product_id in product_ids:
            self._products.pop(product_id, None)
            self._changed_at[product_id] = self._generation
            if self._fetches:
                self._forgotten_at[product_id] = self._generation

    def forget_everything(self) -> None:
        """Any product may have changed; reads in flight are not stored either."""
        self._drop_all()
        self._everything_changed()

    def start_caching(self) -> None:
        """For when the listener has connected: from now on every change is heard, so
        products read from now on may be kept."""
        self._drop_all()
        self._caching = True
        self._on_listening(True)

    def stop_caching(self) -> None:
        """For when the listener lost its connection: changes may go unheard, so nothing
        is kept until start_caching()."""
        self._drop_all()
        self._everything_changed()
        self._caching = False
        self._on_listening(False)

    def primary_position(self, lsn: int, *, as_of: int) -> None:
        """The primary's WAL position `lsn`, read after the changes heard up to generation
        `as_of` (the `generation` when the listener asked for it)."""
        self._primary = _PrimaryPosition(as_of, lsn)
        self._changed_at = {p: g for p, g in self._changed_at.items() if g > as_of}

    def _drop_all(self) -> None:
        self._products.clear()
        self._epoch += 1

    def _everything_changed(self) -> None:
        self._generation += 1
        self._everything_at = self._generation
        self._changed_at.clear()

    def _fresh_on_replica(self, product_id: str, replayed_lsn: int | None) -> bool:
        primary = self._primary
        return (
            replayed_lsn is not None
            and primary is not None
            and replayed_lsn >= primary.lsn
            and primary.as_of >= self._everything_at
            and self._changed_at.get(product_id, 0) <= primary.as_of
        )

    def read_through(self, fetch: FetchProducts) -> FetchProducts:
        """`fetch` (a batch of lookups in the database), storing what it finds when no
        change to those products was heard while it ran."""

        async def fetch_and_store(product_ids: Sequence[str]) -> Sequence[Product | NotFound]:
            return await self._stored(fetch(product_ids), lambda found: found)

        return fetch_and_store

    async def warm(self, pages: ProductPages, page_size: int = 200) -> int:
        """Fills the cache from the catalog's first pages (a new process, or one whose
        listener reconnected, would otherwise send its first reads for every product to the
        database at once). Returns how many products it read."""
        epoch = self._epoch
        token = ""
        read = 0
        while self.enabled and self._epoch == epoch and len(self._products) < self._capacity:
            limit = min(page_size, self._capacity - len(self._products))
            products, token = await self._stored(pages(limit, token), lambda page: page[0])
            read += len(products)
            if not token:
                break
        return read

    async def _stored(
        self, reading: Awaitable[Read], products_in: Callable[[Read], Sequence[object]]
    ) -> Read:
        """Awaits a database read (not yet started) and stores the products in what it
        returns, unless they may be older than a change heard meanwhile."""
        started = _Fetch(self._generation, self._epoch)
        self._fetches += 1
        try:
            found = await reading
        finally:
            self._fetches -= 1
        read = products_in(found)
        products = [p for p in read if isinstance(p, Product)]
        if isinstance(read, ReadOnReplica):
            # A replica may not yet have replayed a change already heard, which no second
            # notification would drop: its rows answer, and are kept only when fresh.
            products = [p for p in products if self._fresh_on_replica(p.id, read.replayed_lsn)]
        self._store(products, started)
        if not self._fetches:
            self._forgotten_at.clear()
        return found

    def _store(self, products: list[Product], started: _Fetch) -> None:
        if not self.enabled or started.epoch != self._epoch:
            return  # read while caching was off, or before the listener (re)connected
        for product in products:
            if self._forgotten_at.get(product.id, -1) > started.generation:
                continue
            self._products[product.id] = product
            self._products.move_to_end(product.id)
        while len(self._products) > self._capacity:
            self._products.popitem(last=False)


async def follow_product_changes(
    connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]],
    cache: ProductCache,
    *,
    warm_from: ProductPages | None = None,
    heartbeat_seconds: float = 5.0,
    queue_usage: Callable[[float], None] = lambda usage: None,
) -> None:
    """LISTENs for product changes and drops them from `cache`; runs until cancelled. Once
    listening, it fills the cache from `warm_from` in the background. On connecting and at
    every heartbeat it reports PostgreSQL's notification queue usage (0 to 1) to
    `queue_usage`.

    Any failure turns the cache off and is retried with backoff (up to 5 s apart); a
    connection lost after it listened for a while is replaced at once. Between
    notifications a heartbeat checks, every `heartbeat_seconds`, that the connection
    answers and the change triggers are still enabled, so a silently lost connection (a
    partitioned host sends no FIN) or triggers disabled by hand turn the cache off within
    about twice that."""
    while True:
        listened_since: float | None = None
        async for attempt in AsyncRetrying(
            # Anything, not only connection errors: while this task is down the cache is off.
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential(multiplier=0.1, max=5.0),
            before_sleep=lambda state: _log.warning(
                "cannot listen for product changes; the product cache stays off",
                error=repr(state.outcome.exception()) if state.outcome else None,
                attempt=state.attempt_number,
            ),
        ):
            with attempt:
                conn = await connect()
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    asked_at = cache.generation
                    usage, primary_lsn = await _check_announced(conn)
                    queue_usage(usage)
                    listened_since = time.monotonic()
                    await _follow(
                        conn,
                        cache,
                        warm_from,
                        heartbeat_seconds,
                        queue_usage,
                        connected_at=(asked_at, primary_lsn),
                    )
                finally:
                    # Not `async with`: its exit would wait for the connection's lock, which
                    # a heartbeat cancelled on a dead connection may hold for a long time.
                    await conn.close()
        if listened_since is None or time.monotonic() - listened_since < _STEADY_SECONDS:
            # Lost soon after connecting (a proxy's idle timeout, say): not in a tight loop,
            # each round clearing the cache and starting to fill it again.
            await asyncio.sleep(_STEADY_SECONDS / 10)


_STEADY_SECONDS = 30.0
_TRIGGERS = ("products_updated_notify", "products_deleted_notify", "products_truncated_notify")


async def _check_announced(conn: psycopg.AsyncConnection[Any]) -> tuple[float, int]:
    """Refuses to cache when changes would go unheard: a schema older than migration 0004,
    or its triggers disabled (or firing only for replication sessions: 'R'). Returns the
    notification queue's usage: a listener anywhere in the cluster that stops reading keeps
    the queue from emptying, and once it is full every NOTIFY, so every change of products
    (every order), fails. And the primary's WAL insert position: past every commit whose
    notification was heard before this query was sent."""
    cursor = await conn.execute(
        "SELECT (SELECT count(*) FROM pg_trigger"
        "         WHERE tgrelid = CAST('products' AS regclass)"
        "           AND tgname = ANY(%s) AND tgenabled IN ('O', 'A')),"
        " pg_notification_queue_usage(),"
        " CAST(pg_current_wal_insert_lsn() - '0/0' AS bigint)",
        (list(_TRIGGERS),),
    )
    row = await cursor.fetchone()
    if row is None or row[0] != len(_TRIGGERS):
        raise RuntimeError(
            "products' change triggers are missing or disabled (migration 0004):"
            " the product cache stays off"
        )
    return float(row[1]), int(row[2])


async def _follow(
    conn: psycopg.AsyncConnection[Any],
    cache: ProductCache,
    warm_from: ProductPages | None,
    heartbeat_seconds: float,
    queue_usage: Callable[[float], None],
    *,
    connected_at: tuple[int, int],
) -> None:
    """Returns when the connection is lost, with the cache off. `connected_at`: the
    cache's generation when the primary's WAL position was read on connecting, and it."""
    cache.start_caching()
    asked_at, primary_lsn = connected_at
    cache.primary_position(primary_lsn, as_of=asked_at)
    # Alongside, not before, the loop below: changes heard while a page is read keep it out.
    warming = asyncio.create_task(cache.warm(warm_from)) if warm_from else None
    if warming is not None:
        warming.add_done_callback(_log_warming)
    try:
        while True:
            async for note in conn.notifies(timeout=heartbeat_seconds):
                if note.payload == EVERYTHING:
                    cache.forget_everything()
                else:
                    cache.forget(note.payload.split(","))
            asked_at = cache.generation
            usage, primary_lsn = await _heartbeat(conn, cache, heartbeat_seconds)
            queue_usage(usage)
            cache.primary_position(primary_lsn, as_of=asked_at)
    except _CONNECTION_ERRORS as error:
        _log.warning("lost the product changes connection; reconnecting", error=repr(error))
    finally:
        cache.stop_caching()
        if warming is not None:
            warming.cancel()
            # Over before this returns: at shutdown the pools close next, under its reads.
            await asyncio.wait({warming})


async def _heartbeat(
    conn: psycopg.AsyncConnection[Any], cache: ProductCache, seconds: float
) -> tuple[float, int]:
    """The connection answers within `seconds`, and the triggers are still on; returns
    _check_announced's answer."""
    ping = asyncio.ensure_future(_check_announced(conn))
    try:
        done, _ = await asyncio.wait({ping}, timeout=seconds)
        if not done:
            # Now, not once psycopg has finished cancelling on a dead connection.
            cache.stop_caching()
            raise TimeoutError(f"no answer to a heartbeat within {seconds} s")
        return ping.result()
    finally:
        if not ping.done():  # timed out, or this task was cancelled (shutdown)
            ping.cancel()
            ping.add_done_callback(lambda task: task.cancelled() or task.exception())


def _log_warming(warming: asyncio.Task[int]) -> None:
    if warming.cancelled():
        return
    if (error := warming.exception()) is not None:
        _log.warning(
            "could not fill the product cache; it fills as products are read", error=str(error)
        )
    else:
        _log.info("product cache filled", products=warming.result())


def served_from(
    cache: ProductCache, lookup: GetProduct, *, hit: Callable[[], None], miss: Callable[[], None]
) -> GetProduct:
    """GetProduct from `cache`, else from `lookup` (which stores what it reads)."""

    async def get_product(product_id: str) -> Product:
        product = cache.get(product_id)
        if product is None:
            miss()
            return await lookup(product_id)
        hit()
        return product

    return get_product


def no_cache(product_ids: Collection[str]) -> None:
    """ProductsChanged for a use case built without a cache (tests, tools)."""
