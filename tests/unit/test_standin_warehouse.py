"""The stand-in warehouse's decisions (devstack/warehouse.py), without NATS: what it ships,
the messages it sends, and that they read as the marketplace's consumers read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack.warehouse import (
    SHIPMENTS_SUBJECT,
    STOCK_LEVELS_SUBJECT,
    WarehouseState,
    next_version,
)
from marketplace.events.v1 import events_pb2
from marketplace.warehouse.v1 import warehouse_pb2
from server.events.warehouse import parse_shipment, parse_stock_level

pytestmark = pytest.mark.unit

ORDER = "5f0c3a52-4a4c-4c1d-9f6e-2b8f0d4c9a11"


def request(*lines: tuple[str, int]) -> events_pb2.FulfilmentRequested:
    return events_pb2.FulfilmentRequested(
        order_id=ORDER,
        lines=[events_pb2.FulfilmentLine(sku=sku, quantity=quantity) for sku, quantity in lines],
    )


def test_it_ships_what_it_stocks_once_and_says_which_level_reflects_it() -> None:
    state = WarehouseState()
    state.set_level("MUG", "main", 10)
    before = state.levels["MUG"]["main"][1]
    sent = state.ship(request(("MUG", 3), ("PEN", 1)))  # PEN: not stocked here
    level_sent, shipment_sent = sent
    assert level_sent.subject == STOCK_LEVELS_SUBJECT
    assert shipment_sent.subject == SHIPMENTS_SUBJECT
    level = parse_stock_level(level_sent.body.encode())
    assert (level.sku, level.warehouse, level.on_hand) == ("MUG", "main", 7)
    assert level.version > before
    assert level_sent.message_id == level.message_id
    shipment = parse_shipment(shipment_sent.body.encode())
    assert shipment.order_id == ORDER
    assert [(line.sku, line.quantity, line.level_version) for line in shipment.lines] == [
        ("MUG", 3, level.version)
    ]
    assert state.ship(request(("MUG", 3))) == []  # a redelivered request: shipped already


def test_a_line_larger_than_a_site_leaves_from_several() -> None:
    state = WarehouseState()
    state.set_level("MUG", "main", 2)
    state.set_level("MUG", "east", 5)
    sent = state.ship(request(("MUG", 6)))
    shipments = [parse_shipment(m.body.encode()) for m in sent if m.subject == SHIPMENTS_SUBJECT]
    assert {(s.warehouse, s.lines[0].quantity) for s in shipments} == {("east", 5), ("main", 1)}
    assert state.levels["MUG"]["east"][0] == 0
    assert state.levels["MUG"]["main"][0] == 1


def test_levels_pushed_by_hand_are_adopted_when_newer() -> None:
    state = WarehouseState()
    state.set_level("MUG", "main", 10)
    held = state.levels["MUG"]["main"][1]
    pushed = warehouse_pb2.StockLevel(sku="MUG", warehouse="main", on_hand=40, version=held + 1)
    assert state.adopt(pushed)
    assert not state.adopt(
        warehouse_pb2.StockLevel(sku="MUG", warehouse="main", on_hand=1, version=held)
    )
    assert state.levels["MUG"]["main"] == (40, held + 1)
    # its own next level grows past the pushed one
    state.ship(request(("MUG", 1)))
    assert state.levels["MUG"]["main"][1] > held + 1


def test_versions_only_grow() -> None:
    assert next_version(0) > 1_700_000_000_000_000  # microseconds since the epoch
    far_ahead = next_version(0) + 10**9
    assert next_version(far_ahead) == far_ahead + 1


def test_the_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "warehouse.json"
    state = WarehouseState()
    state.set_level("MUG", "main", 10)
    state.outgoing.extend(state.ship(request(("MUG", 2))))
    state.save(path)
    again = WarehouseState.load(path)
    assert again.levels == state.levels
    assert again.shipped == {ORDER}
    assert again.outgoing == state.outgoing
    assert json.loads(path.read_text())["levels"]["MUG"]["main"]["onHand"] == 8
