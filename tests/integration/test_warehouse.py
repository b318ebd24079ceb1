"""Warehouse-managed products on a real PostgreSQL: stock levels and shipments applied by the
use cases (server/services/warehouse.py) through the consumers' inbox, orders placed,
cancelled, expired and refunded meanwhile."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from marketplace.events.v1 import events_pb2
from server.db.driver import DriverPool
from server.domain.catalog import PriceInput, new_product, product_changes, stock_adjustment
from server.domain.errors import FailedPrecondition, InvalidArgument
from server.domain.identity import Principal, Role
from server.domain.inventory import (
    InventorySource,
    Shipment,
    StockLevel,
    WarehouseMessageRefused,
    shipment,
    stock_level,
)
from server.domain.orders import OrderStatus, cancel_request, order_request
from server.domain.payments import PaymentStatus, refund_request
from server.events.consumers import Inbox
from server.services.use_cases import UseCases
from server.services.warehouse import Applied, WarehouseFeed
from tests.conftest import stock_of, table_snapshot
from tests.use_cases import wired

pytestmark = pytest.mark.integration

ADMIN = Principal("root", frozenset({Role.ADMIN}))


def warehouse_product(database_url: str, *, sku: str | None = None, price: str = "10.00") -> str:
    """A warehouse-managed product with no level yet (stock 0), seeded straight in."""
    product_id = str(uuid.uuid4())
    with psycopg.connect(database_url) as conn:
        conn.execute(
            """
            INSERT INTO products (id, sku, name, description, price_currency, price_amount,
                                  stock, inventory_source)
            VALUES (%s, %s, 'Warehouse product', '', 'USD', %s, 0, 'WAREHOUSE')
            """,
            (product_id, sku or f"WH-{product_id[:8]}", Decimal(price)),
        )
    return product_id


def sku_of(database_url: str, product_id: str) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT sku FROM products WHERE id = %s", (product_id,)).fetchone()
    assert row is not None
    return str(row[0])


def status_of(database_url: str, order_id: str) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT status FROM orders WHERE id = %s", (order_id,)).fetchone()
    assert row is not None
    return str(row[0])


def mark_paid(database_url: str, order_ids: Sequence[str]) -> None:
    """Test arrangement: these pending orders are paid (payments do not matter here)."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE orders SET status = 'PAID' WHERE id = ANY(%s::uuid[])"
            " AND status = 'PENDING_PAYMENT'",
            (list(order_ids),),
        )


class Feed:
    """The two consumers' effect: each message applied once, in the inbox row's transaction,
    as server/events/warehouse.py does."""

    def __init__(self, engine: AsyncEngine, warehouse: WarehouseFeed) -> None:
        self.inbox = Inbox(engine)
        self.warehouse = warehouse

    async def level(self, level: StockLevel) -> Applied | None:
        async with self.inbox.once("warehouse-stock-levels", level.message_id) as conn:
            return None if conn is None else await self.warehouse.apply_stock_level(conn, level)

    async def shipment(self, shipped: Shipment) -> Applied | None:
        async with self.inbox.once("warehouse-shipments", shipped.shipment_id) as conn:
            return None if conn is None else await self.warehouse.apply_shipment(conn, shipped)

    async def deliver(self, message: StockLevel | Shipment) -> Applied | None:
        if isinstance(message, StockLevel):
            return await self.level(message)
        return await self.shipment(message)


@pytest.fixture
def feed(engine: AsyncEngine, use_cases: UseCases) -> Feed:
    return Feed(engine, use_cases.warehouse)


def level(sku: str, on_hand: int, version: int, warehouse: str = "main") -> StockLevel:
    return stock_level(sku=sku, warehouse=warehouse, on_hand=on_hand, version=version)


def shipped(
    order_id: str,
    lines: Sequence[tuple[str, int, int]],
    *,
    shipment_id: str | None = None,
    warehouse: str = "main",
) -> Shipment:
    return shipment(
        shipment_id=shipment_id or f"SHP-{uuid.uuid4()}",
        order_id=order_id,
        warehouse=warehouse,
        lines=lines,
    )


async def place(use_cases: UseCases, *lines: tuple[str, int]) -> str:
    order = await use_cases.placement.place_order(
        f"cust-{uuid.uuid4().hex[:8]}", order_request(f"r-{uuid.uuid4()}", list(lines))
    )
    return order.id


async def test_a_level_sets_the_stock_and_only_a_newer_one_moves_it(
    feed: Feed, database_url: str
) -> None:
    product = warehouse_product(database_url)
    sku = sku_of(database_url, product)
    applied = await feed.level(level(sku, 40, 5))
    assert applied is not None
    assert [(c.before, c.after) for c in applied.stock_changes] == [(0, 40)]
    assert stock_of(database_url, product) == 40
    assert await feed.level(level(sku, 40, 5)) is None  # the same message: the inbox has it
    unchanged = await feed.level(level(sku, 99, 4))  # older: history
    assert unchanged is not None
    assert unchanged.stock_changes == ()
    await feed.level(level(sku, 12, 3, warehouse="east"))  # another warehouse adds up
    assert stock_of(database_url, product) == 52


async def test_refused_levels_write_nothing(
    feed: Feed, use_cases: UseCases, database_url: str
) -> None:
    here = await use_cases.catalog.create_product(
        new_product(
            sku=f"HERE-{uuid.uuid4().hex[:8]}",
            name="Managed here",
            description="",
            price=PriceInput("USD", 5, 0),
            stock=3,
        )
    )
    before = table_snapshot(database_url)
    with pytest.raises(WarehouseMessageRefused, match="not managed by the warehouse"):
        await feed.level(level(here.sku, 10, 1))
    with pytest.raises(WarehouseMessageRefused, match="no product has sku"):
        await feed.level(level("NO-SUCH-SKU", 10, 1))
    assert table_snapshot(database_url) == before
    # the inbox row went with the refused transaction: a replay after a fix applies it
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE products SET inventory_source = 'WAREHOUSE' WHERE id = %s", (here.id,))
    assert await feed.level(level(here.sku, 10, 1)) is not None
    assert stock_of(database_url, here.id) == 10


@pytest.mark.parametrize("shipment_first", [True, False])
async def test_a_shipment_and_its_level_in_either_order(
    shipment_first: bool, feed: Feed, use_cases: UseCases, database_url: str
) -> None:
    product = warehouse_product(database_url)
    sku = sku_of(database_url, product)
    await feed.level(level(sku, 10, 1))
    order_id = await place(use_cases, (product, 3))
    assert stock_of(database_url, product) == 7
    mark_paid(database_url, [order_id])
    the_shipment, the_level = shipped(order_id, [(sku, 3, 2)]), level(sku, 7, 2)
    if shipment_first:
        applied = await feed.shipment(the_shipment)
        assert applied is not None
        assert applied.shipped_order == order_id
        assert stock_of(database_url, product) == 7  # 10 - 3 shipped, not yet reflected
        await feed.level(the_level)
    else:
        await feed.level(the_level)
        assert stock_of(database_url, product) == 4  # 7 - 3 still committed: never more
        await feed.shipment(the_shipment)
    assert stock_of(database_url, product) == 7
    assert status_of(database_url, order_id) == OrderStatus.SHIPPED.value
    assert await feed.shipment(the_shipment) is None  # repeated: the inbox has it


async def test_refused_shipments_write_nothing(
    feed: Feed, use_cases: UseCases, database_url: str
) -> None:
    product = warehouse_product(database_url)
    sku = sku_of(database_url, product)
    await feed.level(level(sku, 10, 1))
    order_id = await place(use_cases, (product, 3))
    before = table_snapshot(database_url)
    refusals = [
        (shipped(order_id, [(sku, 3, 2)]), "not paid"),
        (shipped(str(uuid.uuid4()), [(sku, 3, 2)]), "no order has id"),
    ]
    for refused, because in refusals:
        with pytest.raises(WarehouseMessageRefused, match=because):
            await feed.shipment(refused)
    mark_paid(database_url, [order_id])
    before = table_snapshot(database_url)
    for refused, because in [
        (shipped(order_id, [(sku, 4, 2)]), "has 3 left to ship"),
        (shipped(order_id, [("OTHER", 1, 2)]), "no line for sku 'OTHER'"),
    ]:
        with pytest.raises(WarehouseMessageRefused, match=because):
            await feed.shipment(refused)
    assert table_snapshot(database_url) == before
    assert status_of(database_url, order_id) == OrderStatus.PAID.value


async def test_a_paid_order_ships_in_parts_from_two_warehouses(
    feed: Feed, use_cases: UseCases, database_url: str
) -> None:
    product = warehouse_product(database_url)
    sku = sku_of(database_url, product)
    await feed.level(level(sku, 2, 1, "main"))
    await feed.level(level(sku, 3, 1, "east"))
    order_id = await place(use_cases, (product, 5))
    mark_paid(database_url, [order_id])
    await feed.shipment(shipped(order_id, [(sku, 2, 2)], warehouse="main"))
    assert status_of(database_url, order_id) == OrderStatus.PAID.value
    await feed.level(level(sku, 10, 2, "east"))  # a delivery at east: 3 still to ship
    assert stock_of(database_url, product) == 7  # 0 (main, 2 in flight) + 10 - 3
    await feed.shipment(shipped(order_id, [(sku, 3, 3)], warehouse="east"))
    assert status_of(database_url, order_id) == OrderStatus.SHIPPED.value
    assert stock_of(database_url, product) == 7


async def test_releasing_a_warehouse_products_order_recounts_rather_than_adds_back(
    feed: Feed, engine: AsyncEngine, hot_path: DriverPool, database_url: str
) -> None:
    # The warehouse reports fewer units than are committed: stock is 0 (never negative).
    # Giving the cancelled order's 4 units back would make 4 sellable of the 2 on hand.
    product = warehouse_product(database_url)
    sku = sku_of(database_url, product)
    quick = wired(engine, hot_path, payment_window_seconds=0.05)
    await feed.level(level(sku, 10, 1))
    cancelled = await place(quick, (product, 4))
    expiring = await place(quick, (product, 3))
    await feed.level(level(sku, 2, 2))  # breakage at the warehouse
    assert stock_of(database_url, product) == 0
    buyer = (await quick.order_reads.get_order(ADMIN, cancelled)).customer_id
    customer = Principal(buyer, frozenset({Role.CUSTOMER}))
    await quick.cancellation.cancel_order(customer, cancel_request(cancelled, ""))
    assert stock_of(database_url, product) == 0  # 2 - 3 still committed
    await asyncio.sleep(0.1)
    while await quick.upkeep.expire_orders():
        pass
    assert status_of(database_url, expiring) == OrderStatus.EXPIRED.value
    assert stock_of(database_url, product) == 2


async def test_a_shipped_order_is_not_cancellable_and_its_refund_gives_no_stock_back(
    feed: Feed, use_cases: UseCases, database_url: str
) -> None:
    product = warehouse_product(database_url)
    sku = sku_of(database_url, product)
    await feed.level(level(sku, 10, 1))
    order_id = await place(use_cases, (product, 3))
    mark_paid(database_url, [order_id])
    payment_id = str(uuid.uuid4())
    with psycopg.connect(database_url) as conn:
        # A payment the provider never saw: refunded "outside the provider", no call made.
        conn.execute(
            """
            INSERT INTO payments (id, order_id, customer_id, request_id, request_fingerprint,
                                  status, currency, amount, provider, payment_method)
            SELECT %s, id, customer_id, 'pay-1', repeat('0', 64), 'SUCCEEDED', currency,
                   total, 'stripe', 'pm_x'
              FROM orders WHERE id = %s
            """,
            (payment_id, order_id),
        )
    await feed.shipment(shipped(order_id, [(sku, 3, 2)]))
    await feed.level(level(sku, 7, 2))
    assert stock_of(database_url, product) == 7
    order = await use_cases.order_reads.get_order(ADMIN, order_id)
    with pytest.raises(FailedPrecondition) as refused:
        await use_cases.cancellation.cancel_order(
            Principal(order.customer_id, frozenset({Role.CUSTOMER})), cancel_request(order_id, "")
        )
    assert refused.value.reason == "ORDER_NOT_CANCELLABLE"
    refunded = await use_cases.refunds.refund_payment(
        ADMIN,
        refund_request(payment_id, "refund-1", None, [], "returned", outside_provider=True),
    )
    assert refunded.status is PaymentStatus.REFUNDED
    assert status_of(database_url, order_id) == OrderStatus.REFUNDED.value
    assert stock_of(database_url, product) == 7


async def test_adjust_stock_is_refused_for_a_warehouse_product(
    use_cases: UseCases, database_url: str
) -> None:
    product = warehouse_product(database_url)
    before = table_snapshot(database_url)
    with pytest.raises(FailedPrecondition) as refused:
        await use_cases.catalog.adjust_stock(
            "root", stock_adjustment(product, 5, "delivery", f"adj-{uuid.uuid4()}")
        )
    assert refused.value.reason == "STOCK_MANAGED_BY_WAREHOUSE"
    assert table_snapshot(database_url) == before


async def test_the_inventory_source_is_chosen_at_creation_and_can_change(
    feed: Feed, use_cases: UseCases, database_url: str
) -> None:
    sku = f"SRC-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidArgument):
        new_product(
            sku=sku,
            name="n",
            description="",
            price=PriceInput("USD", 5, 0),
            stock=3,
            inventory_source=InventorySource.WAREHOUSE,
        )
    created = await use_cases.catalog.create_product(
        new_product(
            sku=sku,
            name="n",
            description="",
            price=PriceInput("USD", 5, 0),
            stock=0,
            inventory_source=InventorySource.WAREHOUSE,
        )
    )
    assert created.inventory_source is InventorySource.WAREHOUSE
    await feed.level(level(sku, 8, 1))
    back_here = await use_cases.catalog.update_product(
        created.id,
        product_changes(
            ["inventory_source"],
            sku="",
            name="",
            description="",
            price=None,
            inventory_source=InventorySource.MANAGED_HERE,
        ),
    )
    assert (back_here.inventory_source, back_here.stock) == (InventorySource.MANAGED_HERE, 8)
    await use_cases.catalog.adjust_stock(
        "root", stock_adjustment(created.id, 5, "found more", f"adj-{uuid.uuid4()}")
    )
    assert stock_of(database_url, created.id) == 13
    # Back to the warehouse: its levels decide again, recounted at once.
    again = await use_cases.catalog.update_product(
        created.id,
        product_changes(
            ["inventory_source"],
            sku="",
            name="",
            description="",
            price=None,
            inventory_source=InventorySource.WAREHOUSE,
        ),
    )
    assert (again.inventory_source, again.stock) == (InventorySource.WAREHOUSE, 8)


@dataclass
class _Warehouse:
    """The physical warehouse of the shuffled test: what is really on hand per SKU and site,
    each level's version, and the messages it has published and the marketplace has not
    received yet (shuffled, repeated and late)."""

    rng: random.Random
    on_hand: dict[tuple[str, str], int]
    versions: Counter[tuple[str, str]] = field(default_factory=Counter)
    in_flight: list[StockLevel | Shipment] = field(default_factory=list)
    shipments: int = 0

    def publish_level(self, sku: str, site: str) -> int:
        self.versions[(sku, site)] += 1
        version = self.versions[(sku, site)]
        self.in_flight.append(level(sku, self.on_hand[(sku, site)], version, site))
        return version

    def restock(self) -> None:
        sku, site = self.rng.choice(sorted(self.on_hand))
        self.on_hand[(sku, site)] += self.rng.randint(1, 8)
        self.publish_level(sku, site)

    def ship(self, order_id: str, lines: dict[str, int]) -> None:
        """Ships a paid order from the sites that have its units, one shipment per site."""
        left = dict(lines)
        for site in sorted({site for _, site in self.on_hand}):
            taken: list[tuple[str, int, int]] = []
            for sku in sorted(left):
                take = min(left[sku], self.on_hand[(sku, site)])
                if take:
                    self.on_hand[(sku, site)] -= take
                    left[sku] -= take
                    taken.append((sku, take, self.publish_level(sku, site)))
            if taken:
                self.shipments += 1
                self.in_flight.append(
                    shipped(order_id, taken, shipment_id=f"S-{self.shipments}", warehouse=site)
                )
        assert not any(left.values()), f"order {order_id} sold units the warehouse lacks"

    def take_message(self) -> StockLevel | Shipment:
        message = self.in_flight.pop(self.rng.randrange(len(self.in_flight)))
        if self.rng.random() < 0.25:
            # Redelivered later, or published twice by the warehouse.
            self.in_flight.insert(self.rng.randrange(len(self.in_flight) + 1), message)
        return message


async def test_levels_and_shipments_shuffled_repeated_and_delayed_never_oversell(
    feed: Feed, use_cases: UseCases, database_url: str
) -> None:
    """The issue's test: a seeded random schedule of a few thousand warehouse messages over
    three products at two sites, delivered shuffled, repeated and late, several at once,
    while customers place orders concurrently (some cancelled, most paid and shipped by the
    warehouse). At every pause no unit is sold beyond what the warehouse has, and once the
    messages stop each product's stock is on-hand minus unshipped units."""
    rng = random.Random(15)
    products = [warehouse_product(database_url) for _ in range(3)]
    skus = {product: sku_of(database_url, product) for product in products}
    sites = ("main", "east")
    warehouse = _Warehouse(rng, {(skus[p], s): rng.randint(5, 30) for p in products for s in sites})
    for sku, site in sorted(warehouse.on_hand):
        warehouse.publish_level(sku, site)
    open_orders: dict[str, dict[str, int]] = {}  # not shipped by the warehouse yet: sku -> units
    pending: list[str] = []
    delivered = 0

    async def customer() -> None:
        chosen = rng.sample(products, rng.randint(1, 2))
        lines = [(product, rng.randint(1, 3)) for product in chosen]
        try:
            order_id = await place(use_cases, *lines)
        except FailedPrecondition:
            return  # out of stock: the marketplace says no
        open_orders[order_id] = {skus[product]: quantity for product, quantity in lines}
        pending.append(order_id)

    async def delivery() -> None:
        nonlocal delivered
        if warehouse.in_flight:
            delivered += 1
            await feed.deliver(warehouse.take_message())

    while delivered < 2000:
        # Orders and messages at once: their transactions meet on the same product rows.
        work = [customer() for _ in range(rng.randint(0, 3))]
        work += [delivery() for _ in range(rng.randint(4, 10))]
        rng.shuffle(work)
        await asyncio.gather(*work)
        if pending and rng.random() < 0.3:
            cancelled = pending.pop(rng.randrange(len(pending)))
            order = await use_cases.order_reads.get_order(ADMIN, cancelled)
            await use_cases.cancellation.cancel_order(
                Principal(order.customer_id, frozenset({Role.CUSTOMER})),
                cancel_request(cancelled, ""),
            )
            del open_orders[cancelled]
        if pending and rng.random() < 0.6:
            paid = pending.pop(0)
            mark_paid(database_url, [paid])
            warehouse.ship(paid, open_orders.pop(paid))
        if rng.random() < 0.15:
            warehouse.restock()
        _check_never_oversold(database_url, warehouse, open_orders, products, skus)
    for order_id in pending:
        mark_paid(database_url, [order_id])
        warehouse.ship(order_id, open_orders.pop(order_id))
    while warehouse.in_flight:
        delivered += 1
        await feed.deliver(warehouse.in_flight.pop(rng.randrange(len(warehouse.in_flight))))
    assert not open_orders
    for product in products:
        on_hand = sum(
            units for (sku, _), units in warehouse.on_hand.items() if sku == skus[product]
        )
        assert stock_of(database_url, product) == on_hand
    with psycopg.connect(database_url) as conn:
        statuses = conn.execute(
            "SELECT DISTINCT o.status FROM orders o JOIN order_lines l ON l.order_id = o.id"
            " WHERE l.product_id = ANY(%s::uuid[])",
            (products,),
        ).fetchall()
    assert {status for (status,) in statuses} <= {"SHIPPED", "CANCELLED"}


def _check_never_oversold(
    database_url: str,
    warehouse: _Warehouse,
    open_orders: dict[str, dict[str, int]],
    products: list[str],
    skus: dict[str, str],
) -> None:
    """What the marketplace still offers fits in what the warehouse really has free."""
    committed: defaultdict[str, int] = defaultdict(int)
    for lines in open_orders.values():
        for sku, units in lines.items():
            committed[sku] += units
    with psycopg.connect(database_url) as conn:
        stocks = dict(
            conn.execute(
                "SELECT id::text, stock FROM products WHERE id = ANY(%s::uuid[])", (products,)
            ).fetchall()
        )
    for product in products:
        sku = skus[product]
        on_hand = sum(units for (s, _), units in warehouse.on_hand.items() if s == sku)
        free = on_hand - committed[sku]
        assert free >= 0, f"{sku}: {committed[sku]} units sold, {on_hand} on hand"
        assert stocks[product] <= free, f"{sku}: {stocks[product]} offered, {free} free"


async def test_the_warehouse_writes_its_events_with_the_change(
    feed: Feed, use_cases: UseCases, database_url: str
) -> None:
    product = warehouse_product(database_url)
    sku = sku_of(database_url, product)
    await feed.level(level(sku, 10, 1))
    order_id = await place(use_cases, (product, 3))
    mark_paid(database_url, [order_id])
    await feed.level(level(sku, 7, 2))  # before its shipment: 3 too few for a moment
    await feed.shipment(shipped(order_id, [(sku, 3, 2)], shipment_id=f"S-{order_id}"))
    await feed.level(level(sku, 7, 2))  # repeated: changes nothing, writes nothing
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT subject, sequence, payload FROM outbox WHERE aggregate_id = ANY(%s)"
            " ORDER BY position",
            ([product, order_id],),
        ).fetchall()
    stock_events = [
        (events_pb2.StockChanged.FromString(payload), sequence)
        for subject, sequence, payload in rows
        if subject == "marketplace.inventory.stock_changed"
    ]
    assert [(e.cause, e.stock, e.delta, sequence) for e, sequence in stock_events] == [
        (events_pb2.STOCK_CHANGE_CAUSE_WAREHOUSE_LEVEL, 10, 10, 1),
        (events_pb2.STOCK_CHANGE_CAUSE_ORDER_PLACED, 7, -3, 2),
        (events_pb2.STOCK_CHANGE_CAUSE_WAREHOUSE_LEVEL, 4, -3, 3),
        (events_pb2.STOCK_CHANGE_CAUSE_SHIPMENT, 7, 3, 4),
    ]
    assert stock_events[-1][0].shipment_id == f"S-{order_id}"
    assert list(stock_events[-1][0].order_ids) == [order_id]
    [shipped_event] = [
        events_pb2.OrderShipped.FromString(payload)
        for subject, _, payload in rows
        if subject == "marketplace.order.shipped"
    ]
    assert shipped_event.shipment_id == f"S-{order_id}"
    assert shipped_event.warehouse == "main"
    assert [(line.sku, line.quantity) for line in shipped_event.lines] == [(sku, 3)]
