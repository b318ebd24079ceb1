"""Warehouse-managed stock without a database: the messages' rules, the formula, and a small
in-memory book (a fake of server/services/warehouse.py) fed levels and shipments in every
order they can arrive in."""

from __future__ import annotations

import itertools
import random
import uuid
from dataclasses import dataclass, field

import pytest

from server.domain.errors import FailedPrecondition
from server.domain.inventory import (
    AppliedLevel,
    InventorySource,
    OrderedProduct,
    Shipment,
    ShippedUnits,
    StockLevel,
    WarehouseMessageRefused,
    is_reflected,
    level_applies,
    plan_shipment,
    sellable,
    shipment,
    stock_level,
)
from server.domain.orders import OrderEvent, OrderStatus, next_status

pytestmark = pytest.mark.unit

SKU = "MUG-1"
ORDER = str(uuid.UUID(int=1))


def level(on_hand: int, version: int, *, warehouse: str = "main", sku: str = SKU) -> StockLevel:
    return stock_level(sku=sku, warehouse=warehouse, on_hand=on_hand, version=version)


def shipped(
    quantity: int,
    level_version: int,
    *,
    order_id: str = ORDER,
    shipment_id: str = "SHP-1",
    warehouse: str = "main",
    sku: str = SKU,
) -> Shipment:
    return shipment(
        shipment_id=shipment_id,
        order_id=order_id,
        warehouse=warehouse,
        lines=[(sku, quantity, level_version)],
    )


@dataclass
class _Order:
    status: OrderStatus
    quantity: int  # of SKU
    shipped: int = 0


@dataclass
class Book:
    """What the marketplace holds about one warehouse-managed SKU, and the use cases' logic
    on it: the service does the same on rows."""

    levels: dict[str, AppliedLevel] = field(default_factory=dict)
    lines: list[ShippedUnits] = field(default_factory=list)
    shipment_ids: set[str] = field(default_factory=set)
    orders: dict[str, _Order] = field(default_factory=dict)

    @property
    def committed(self) -> int:
        return sum(
            order.quantity - order.shipped
            for order in self.orders.values()
            if order.status in (OrderStatus.PENDING_PAYMENT, OrderStatus.PAID)
        )

    @property
    def stock(self) -> int:
        return sellable(self.levels, self.committed, self.lines)

    def apply_level(self, incoming: StockLevel) -> None:
        if level_applies(self.levels.get(incoming.warehouse), incoming):
            self.levels[incoming.warehouse] = AppliedLevel(incoming.on_hand, incoming.version)

    def apply_shipment(self, incoming: Shipment) -> None:
        if incoming.shipment_id in self.shipment_ids:
            return
        order = self.orders[incoming.order_id]
        ordered = [
            OrderedProduct("p", SKU, order.quantity, order.shipped, InventorySource.WAREHOUSE)
        ]
        plan = plan_shipment(incoming, order.status, ordered)
        self.shipment_ids.add(incoming.shipment_id)
        for line in plan.lines:
            self.lines.append(ShippedUnits(incoming.warehouse, line.quantity, line.level_version))
            order.shipped += line.quantity
        if plan.order_status is not None:
            order.status = plan.order_status

    def place(self, order_id: str, quantity: int) -> bool:
        """An order placed against the sellable stock, paid at once."""
        if quantity > self.stock:
            return False
        self.orders[order_id] = _Order(OrderStatus.PAID, quantity)
        return True


def test_the_formula() -> None:
    levels = {"main": AppliedLevel(10, 5), "east": AppliedLevel(4, 2)}
    in_flight = [ShippedUnits("main", 3, 6), ShippedUnits("main", 2, 5), ShippedUnits("east", 1, 3)]
    # 14 on hand - 5 committed - 3 (main, v6 > 5) - 1 (east, v3 > 2); v5 is reflected
    assert sellable(levels, 5, in_flight) == 5
    assert sellable(levels, 20, in_flight) == 0  # never below zero
    assert sellable({}, 0, []) == 0
    # a shipment from a warehouse with no level yet is not reflected
    assert sellable({"main": AppliedLevel(10, 5)}, 0, [ShippedUnits("west", 2, 1)]) == 8


def test_levels_only_move_forward() -> None:
    assert level_applies(None, level(5, 1))
    assert level_applies(AppliedLevel(5, 1), level(3, 2))
    assert not level_applies(AppliedLevel(5, 2), level(3, 2))  # repeated
    assert not level_applies(AppliedLevel(5, 2), level(9, 1))  # older
    assert is_reflected(2, AppliedLevel(0, 2))
    assert not is_reflected(3, AppliedLevel(0, 2))
    assert not is_reflected(1, None)


def test_shipment_before_its_level() -> None:
    # The first order: the units move from committed to shipped-not-reflected.
    book = Book()
    book.apply_level(level(10, 1))
    assert book.place(ORDER, 3)
    assert book.stock == 7
    book.apply_shipment(shipped(3, level_version=2))
    assert book.orders[ORDER].status is OrderStatus.SHIPPED
    assert book.stock == 7  # 10 - 0 committed - 3 not reflected
    book.apply_level(level(7, 2))
    assert book.stock == 7  # 7 - 0 - 0


def test_level_before_its_shipment() -> None:
    # The second order: the level already excludes the units, still committed.
    book = Book()
    book.apply_level(level(10, 1))
    assert book.place(ORDER, 3)
    book.apply_level(level(7, 2))
    assert book.stock == 4  # 3 too few until the shipment, never too many
    book.apply_shipment(shipped(3, level_version=2))
    assert book.stock == 7


def test_repeated_and_stale_messages_change_nothing() -> None:
    book = Book()
    book.apply_level(level(10, 1))
    assert book.place(ORDER, 3)
    book.apply_shipment(shipped(3, level_version=2))
    book.apply_level(level(7, 2))
    before = book.stock
    book.apply_shipment(shipped(3, level_version=2))  # the same shipment id again
    book.apply_level(level(10, 1))  # the old level, late
    book.apply_level(level(7, 2))  # the same level again
    assert book.stock == before == 7


def test_several_warehouses_add_up_and_ship_apart() -> None:
    book = Book()
    book.apply_level(level(2, 1, warehouse="main"))
    book.apply_level(level(3, 1, warehouse="east"))
    assert book.place(ORDER, 5)
    assert book.stock == 0
    book.apply_shipment(shipped(2, 2, warehouse="main", shipment_id="a"))
    # 3 left to ship from east: the order is still PAID and those units still committed
    assert book.orders[ORDER].status is OrderStatus.PAID
    book.apply_level(level(0, 2, warehouse="main"))
    assert book.stock == 0
    book.apply_level(level(10, 2, warehouse="east"))  # a delivery at east: 13 on hand...
    assert book.stock == 7  # ...minus the 3 still to ship (east's level 2 predates them)
    book.apply_shipment(shipped(3, 3, warehouse="east", shipment_id="b"))
    assert book.orders[ORDER].status is OrderStatus.SHIPPED
    assert book.stock == 7
    book.apply_level(level(7, 3, warehouse="east"))
    assert book.stock == 7


def _ordered(quantity: int = 3, shipped_before: int = 0) -> list[OrderedProduct]:
    return [OrderedProduct("p", SKU, quantity, shipped_before, InventorySource.WAREHOUSE)]


def test_a_shipment_is_matched_to_its_order() -> None:
    plan = plan_shipment(shipped(2, 5), OrderStatus.PAID, _ordered())
    assert [(line.product_id, line.quantity, line.level_version) for line in plan.lines] == [
        ("p", 2, 5)
    ]
    assert plan.order_status is None  # one unit still to ship
    assert plan_shipment(shipped(1, 5), OrderStatus.PAID, _ordered(3, 2)).order_status is (
        OrderStatus.SHIPPED
    )
    # lines managed here are not the warehouse's to ship
    managed_here = OrderedProduct("q", "PEN", 4, 0, InventorySource.MANAGED_HERE)
    plan = plan_shipment(shipped(3, 5), OrderStatus.PAID, [*_ordered(), managed_here])
    assert plan.order_status is OrderStatus.SHIPPED


@pytest.mark.parametrize(
    "status", [OrderStatus.CANCELLED, OrderStatus.EXPIRED, OrderStatus.REFUNDED]
)
def test_a_shipment_of_an_ended_order_is_recorded_as_it_is(status: OrderStatus) -> None:
    # The units left whatever the order became: they must count until a level shows it.
    plan = plan_shipment(shipped(3, 5), status, _ordered())
    assert plan.order_status is None
    assert len(plan.lines) == 1


@pytest.mark.parametrize(
    ("incoming", "status", "ordered", "because"),
    [
        (shipped(3, 5), OrderStatus.PENDING_PAYMENT, _ordered(), "not paid"),
        (shipped(4, 5), OrderStatus.PAID, _ordered(3), "has 3 left to ship"),
        (shipped(2, 5), OrderStatus.PAID, _ordered(3, 2), "has 1 left to ship"),
        (shipped(1, 5, sku="OTHER"), OrderStatus.PAID, _ordered(), "no line for sku 'OTHER'"),
        (shipped(1, 5), OrderStatus.SHIPPED, _ordered(3, 3), "has 0 left to ship"),
        (
            shipped(1, 5),
            OrderStatus.PAID,
            [OrderedProduct("p", SKU, 3, 0, InventorySource.MANAGED_HERE)],
            "is not managed by the warehouse",
        ),
    ],
)
def test_shipments_that_do_not_fit_their_order_are_refused(
    incoming: Shipment, status: OrderStatus, ordered: list[OrderedProduct], because: str
) -> None:
    with pytest.raises(WarehouseMessageRefused, match=because):
        plan_shipment(incoming, status, ordered)


@pytest.mark.parametrize(
    ("fields", "because"),
    [
        ({"sku": "no spaces"}, "sku"),
        ({"sku": ""}, "sku"),
        ({"warehouse": ""}, "warehouse"),
        ({"on_hand": -1}, "onHand"),
        ({"version": 0}, "version"),
        ({"version": 2**63 - 1}, "version"),
    ],
)
def test_malformed_levels_are_refused(fields: dict[str, object], because: str) -> None:
    given: dict[str, object] = {"sku": SKU, "warehouse": "main", "on_hand": 1, "version": 1}
    given.update(fields)
    with pytest.raises(WarehouseMessageRefused, match=because):
        stock_level(**given)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "because"),
    [
        ({"shipment_id": ""}, "shipmentId"),
        ({"order_id": "42"}, "orderId"),
        ({"warehouse": "a/b"}, "warehouse"),
        ({"lines": []}, "at least one line"),
        ({"lines": [(SKU, 0, 1)]}, r"lines\[0\].quantity"),
        ({"lines": [(SKU, 1, 0)]}, r"lines\[0\].levelVersion"),
        ({"lines": [(SKU, 1, 1), (SKU, 1, 1)]}, "repeats sku"),
    ],
)
def test_malformed_shipments_are_refused(fields: dict[str, object], because: str) -> None:
    given: dict[str, object] = {
        "shipment_id": "S",
        "order_id": ORDER,
        "warehouse": "main",
        "lines": [(SKU, 1, 1)],
    }
    given.update(fields)
    with pytest.raises(WarehouseMessageRefused, match=because):
        shipment(**given)  # type: ignore[arg-type]


def test_only_a_paid_order_ships() -> None:
    # SHIPPED is reached only from PAID
    with pytest.raises(FailedPrecondition):
        next_status(ORDER, OrderStatus.PENDING_PAYMENT, OrderEvent.SHIPPED)


def test_every_arrival_order_of_one_shipment_and_its_levels() -> None:
    # Two shipments and the levels around them, delivered in each of their 720 orders, some
    # twice: stock never exceeds what is really sellable, and always ends the same.
    second = str(uuid.UUID(int=2))
    messages: list[StockLevel | Shipment] = [
        level(7, 2),
        shipped(3, 2),
        level(5, 3),
        shipped(2, 3, order_id=second, shipment_id="SHP-2"),
        level(15, 4),  # a delivery of 10
        level(7, 2),  # repeated
    ]
    truth_after = 15  # on hand once everything happened; nothing left to ship
    for arrival in itertools.permutations(messages):
        book = Book()
        book.apply_level(level(10, 1))
        assert book.place(ORDER, 3)
        assert book.place(second, 2)
        for message in arrival:
            if isinstance(message, StockLevel):
                book.apply_level(message)
            else:
                book.apply_shipment(message)
            # The warehouse has at least 5 sellable units at every moment of this story
            # (10 - 5 before, 5 after the shipments, 15 after the delivery).
            assert book.stock <= truth_after
            assert book.stock <= 5 or book.levels["main"].version == 4
        assert book.stock == truth_after


@dataclass
class _Warehouse:
    """The physical warehouse: what is really on hand, per site, and its version counters."""

    on_hand: dict[str, int]
    versions: dict[str, int] = field(default_factory=dict)

    def level(self, site: str) -> StockLevel:
        self.versions[site] = self.versions.get(site, 0) + 1
        return level(self.on_hand[site], self.versions[site], warehouse=site)


@pytest.mark.parametrize("seed", range(40))
def test_shuffled_repeated_and_delayed_messages_never_oversell(seed: int) -> None:
    """The issue's rule on the model: orders are placed against the marketplace's stock
    while levels and shipments arrive shuffled, repeated and late; no order is ever sold a
    unit the warehouse does not have, and once the messages stop the stock is on-hand minus
    unshipped units."""
    rng = random.Random(seed)
    warehouse = _Warehouse({"main": rng.randint(0, 20), "east": rng.randint(0, 20)})
    book = Book()
    in_flight: list[StockLevel | Shipment] = [warehouse.level(s) for s in warehouse.on_hand]
    unshipped: dict[str, int] = {}  # paid orders the warehouse has been asked to ship
    shipments = 0

    def deliver_one() -> None:
        message = in_flight.pop(rng.randrange(len(in_flight)))
        if rng.random() < 0.2:
            in_flight.append(message)  # JetStream redelivers it later
        if isinstance(message, StockLevel):
            book.apply_level(message)
        else:
            book.apply_shipment(message)

    for step in range(300):
        action = rng.random()
        if action < 0.3:
            order_id = str(uuid.UUID(int=1000 + step))
            if book.place(order_id, rng.randint(1, 4)):
                unshipped[order_id] = book.orders[order_id].quantity
        elif action < 0.5 and unshipped:
            order_id = rng.choice(sorted(unshipped))
            # It ships from the sites that have the units, one shipment per site.
            for site in sorted(warehouse.on_hand):
                take = min(unshipped[order_id], warehouse.on_hand[site])
                if take == 0:
                    continue
                warehouse.on_hand[site] -= take
                unshipped[order_id] -= take
                new_level = warehouse.level(site)
                shipments += 1
                in_flight.append(new_level)
                in_flight.append(
                    shipped(
                        take,
                        new_level.version,
                        order_id=order_id,
                        shipment_id=f"S{shipments}",
                        warehouse=site,
                    )
                )
            assert unshipped[order_id] == 0, "sold a unit the warehouse did not have"
            del unshipped[order_id]
        elif action < 0.6:
            site = rng.choice(sorted(warehouse.on_hand))
            warehouse.on_hand[site] += rng.randint(1, 6)  # a delivery
            in_flight.append(warehouse.level(site))
        elif in_flight:
            deliver_one()
        really_free = sum(warehouse.on_hand.values()) - sum(unshipped.values())
        assert really_free >= 0
        assert book.stock <= really_free
    while in_flight:
        deliver_one()
    assert book.stock == sum(warehouse.on_hand.values()) - sum(unshipped.values())
