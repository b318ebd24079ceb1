"""The one-statement order function prototype (tests/bench/order_function.py) keeps the
domain's rules: on the same random batches, sent to OrderPlacement on one catalog and to the
prototype on a mirror of it, every outcome and every stock level come out the same."""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from server.db.driver import DriverPool
from server.domain.errors import DomainError, RequestIdReused
from server.domain.identity import Customer
from server.domain.orders import Order, OrderRequest, order_request
from server.events.outbox import Outbox
from server.services.orders.placement import OrderPlacement
from tests.bench.order_function import FunctionPlacement, drop_function, install_function
from tests.integration.test_orders import _race_with_an_uncommitted_order

pytestmark = pytest.mark.integration

PRODUCTS = 6  # n = 0..5 exist on both sides; n = 6, 7 are ids no product has
UNKNOWN = 2
CUSTOMERS = 3
PRICES = ("1.00", "2.50", "19.99", "0.10")

# An order as generated: (customer number, request id, ((product number, quantity), ...)).
Planned = tuple[int, str, tuple[tuple[int, int], ...]]


@pytest.fixture(scope="module")
def prototype_installed(database_url: str) -> Iterator[None]:
    install_function(database_url)
    yield
    drop_function(database_url)


@pytest.fixture
def placements(
    engine: AsyncEngine, hot_path: DriverPool, prototype_installed: None
) -> tuple[OrderPlacement, FunctionPlacement]:
    """Both without events: the prototype writes none."""
    return (
        OrderPlacement(engine, hot_path, outbox=Outbox(enabled=False)),
        FunctionPlacement(engine, hot_path),
    )


@dataclass(frozen=True)
class Catalog:
    """One side's products and customers; the two sides' ids sort alike, so lock order and
    the order of shortages match."""

    side: str  # "a" or "b", a hex digit leading every product id
    run: int

    def product(self, n: int) -> str:
        return str(uuid.UUID(f"{self.side}{self.run:07x}-0000-4000-8000-{n:012x}"))

    def sku(self, n: int) -> str:
        return f"{self.side}-{self.run}-{n}"

    def customer(self, m: int) -> str:
        return f"{self.side}-{self.run}-c{m}"

    def scrub(self, text: str) -> str:
        """`text` with this side's ids and skus named by their number."""
        text = re.sub(
            rf"{self.side}{self.run:07x}-0000-4000-8000-([0-9a-f]{{12}})",
            lambda match: f"P{int(match.group(1), 16)}",
            text,
        )
        return re.sub(rf"\b{self.side}-{self.run}-(c?\d+)\b", r"X\1", text)

    def batch(self, planned: list[Planned]) -> list[tuple[Customer, OrderRequest]]:
        return [
            (
                Customer(self.customer(m), f"{m}@example.com"),
                order_request(request_id, [(self.product(n), q) for n, q in lines]),
            )
            for m, request_id, lines in planned
        ]

    def request_of(self, database_url: str) -> dict[str, tuple[str, str]]:
        """Each of this side's orders: its (customer, request id), which names it on both."""
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT id, customer_id, request_id FROM orders WHERE customer_id LIKE %s",
                (f"{self.side}-{self.run}-c%",),
            ).fetchall()
        return {str(order_id): (self.scrub(c), r) for order_id, c, r in rows}

    def stocks(self, database_url: str) -> list[int]:
        with psycopg.connect(database_url) as conn:
            return [
                conn.execute(
                    "SELECT stock FROM products WHERE id = %s", (self.product(n),)
                ).fetchone()[0]  # type: ignore[index]
                for n in range(PRODUCTS)
            ]


def seed(database_url: str, sides: tuple[Catalog, ...], rng: random.Random) -> None:
    """The same products on every side: small stocks (shortages are common), one or two in
    euros (mixed currencies)."""
    rows = [
        (rng.randint(0, 8), rng.choice(PRICES), "EUR" if rng.random() < 0.25 else "USD")
        for _ in range(PRODUCTS)
    ]
    with psycopg.connect(database_url) as conn:
        for side in sides:
            for n, (stock, price, currency) in enumerate(rows):
                conn.execute(
                    "INSERT INTO products (id, sku, name, price_currency, price_amount, stock)"
                    " VALUES (%s, %s, 'Prototype check', %s, %s, %s)",
                    (side.product(n), side.sku(n), currency, price, stock),
                )


def random_batches(rng: random.Random, count: int) -> list[list[Planned]]:
    """Batches of 1-10 orders: mostly new requests, some repeating an earlier request (same
    lines: a replay; other lines: a reused request id), some copies inside the batch."""
    history: list[Planned] = []
    batches = []
    for _ in range(count):
        batch: list[Planned] = []
        for _ in range(rng.randint(1, 10)):
            lines = tuple(
                (n, rng.randint(1, 3))
                for n in rng.sample(
                    range(PRODUCTS + UNKNOWN if rng.random() < 0.1 else PRODUCTS),
                    rng.randint(1, 3),
                )
            )
            roll = rng.random()
            if history and roll < 0.15:
                planned = rng.choice(history)
            elif history and roll < 0.25:
                m, request_id, _ = rng.choice(history)
                planned = (m, request_id, lines)
            elif batch and roll < 0.35:
                m, request_id, same = rng.choice(batch)
                planned = (m, request_id, same if rng.random() < 0.5 else lines)
            else:
                planned = (rng.randrange(CUSTOMERS), uuid.uuid4().hex[:12], lines)
            batch.append(planned)
        history.extend(batch)
        batches.append(batch)
    return batches


def shape(outcome: Order | DomainError, side: Catalog, requests: dict[str, tuple[str, str]]) -> str:
    """What both sides must agree on, with ids, skus and customers named by number. An order
    is named by its request (order ids differ between sides), its times by the window."""
    described: tuple[object, ...]
    if isinstance(outcome, Order):
        described = (
            "order",
            requests[outcome.id],
            outcome.customer_id,
            outcome.status,
            outcome.lines,
            outcome.total,
            outcome.expire_time - outcome.create_time,
            outcome.update_time == outcome.create_time,
        )
    else:
        described = (type(outcome).__name__, sorted(vars(outcome).items()))
    return side.scrub(repr(described))


async def test_the_prototype_decides_every_random_batch_as_the_order_placement_does(
    placements: tuple[OrderPlacement, FunctionPlacement], database_url: str
) -> None:
    current, prototype = placements
    rng = random.Random(17)
    kinds: Counter[str] = Counter()
    for run in range(8):
        base = rng.randrange(1 << 24) * 16 + run
        a, b = Catalog("a", base), Catalog("b", base)
        seed(database_url, (a, b), rng)
        for planned in random_batches(rng, 12):
            expected = await current.place_orders(a.batch(planned))
            got = await prototype.place_orders(b.batch(planned))
            requests_a, requests_b = a.request_of(database_url), b.request_of(database_url)
            assert [shape(o, b, requests_b) for o in got] == [
                shape(o, a, requests_a) for o in expected
            ], planned
            kinds.update(getattr(o, "reason", None) or type(o).__name__ for o in expected)
        assert b.stocks(database_url) == a.stocks(database_url)
    # The random batches reached every outcome (replays are Orders).
    assert {"Order", "NotFound", "OUT_OF_STOCK", "MIXED_CURRENCIES", "REQUEST_ID_REUSED"} <= set(
        kinds
    ), kinds


async def test_a_request_id_committed_meanwhile_is_answered_like_the_order_placement(
    placements: tuple[OrderPlacement, FunctionPlacement], database_url: str
) -> None:
    """The function's plain INSERT fails on the unique key when another transaction
    committed the request id after the lookup; the caller runs it again and finds it."""
    _, prototype = placements
    other_id, outcome = await _race_with_an_uncommitted_order(
        prototype,  # type: ignore[arg-type]  # the same place_order
        database_url,
        same_lines=True,
    )
    assert getattr(outcome, "id", None) == other_id, outcome
    _, outcome = await _race_with_an_uncommitted_order(
        prototype,  # type: ignore[arg-type]
        database_url,
        same_lines=False,
    )
    assert isinstance(outcome, RequestIdReused), outcome
