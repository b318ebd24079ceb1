"""Reading the warehouse's JSON (server/events/warehouse.py): protobuf's JSON mapping, unknown
fields refused, every refusal a WarehouseMessageRefused the consumer dead-letters."""

from __future__ import annotations

import pytest

from server.domain.inventory import WarehouseMessageRefused
from server.events.warehouse import parse_shipment, parse_stock_level

pytestmark = pytest.mark.unit

ORDER = "5f0c3a52-4a4c-4c1d-9f6e-2b8f0d4c9a11"


def test_a_level_in_the_json_mapping() -> None:
    level = parse_stock_level(
        b'{"sku": "MUG-1", "warehouse": "main", "onHand": 40, "version": "7"}'
    )
    assert (level.sku, level.warehouse, level.on_hand, level.version) == ("MUG-1", "main", 40, 7)
    assert level.message_id == "MUG-1/main/7"
    # protobuf's JSON mapping also takes the proto field names
    assert (
        parse_stock_level(
            b'{"sku": "MUG-1", "warehouse": "main", "on_hand": 0, "version": 1}'
        ).on_hand
        == 0
    )


def test_a_shipment_in_the_json_mapping() -> None:
    shipment = parse_shipment(
        b'{"shipmentId": "S-1", "orderId": "' + ORDER.upper().encode() + b'", "warehouse": "main",'
        b' "lines": [{"sku": "MUG-1", "quantity": 2, "levelVersion": 9}]}'
    )
    assert shipment.order_id == ORDER  # canonical form
    assert [(line.sku, line.quantity, line.level_version) for line in shipment.lines] == [
        ("MUG-1", 2, 9)
    ]


@pytest.mark.parametrize(
    ("data", "because"),
    [
        (b'{"sku": "MUG-1", "warehouse": "main", "onHand": 4, "version": 1, "x": 1}', "x"),
        (b'{"sku": "MUG-1", "onHand": 4, "version": 1}', "warehouse"),  # missing: empty
        (b'{"sku": "MUG-1", "warehouse": "main", "onHand": "four", "version": 1}', "onHand"),
        (b'{"sku": "MUG-1", "warehouse": "main", "onHand": 4}', "version"),
        (b"not json", "StockLevel"),
        (b"\xff\xfe", "StockLevel"),
        (b"[]", "sku"),  # read as an empty message: refused for its empty fields
    ],
)
def test_malformed_levels_are_refused(data: bytes, because: str) -> None:
    with pytest.raises(WarehouseMessageRefused, match=because):
        parse_stock_level(data)


@pytest.mark.parametrize(
    ("data", "because"),
    [
        (b'{"shipmentId": "S", "orderId": "' + ORDER.encode() + b'", "warehouse": "main"}', "line"),
        (
            b'{"shipmentId": "S", "orderId": "' + ORDER.encode() + b'", "warehouse": "main",'
            b' "lines": [{"sku": "MUG-1", "quantity": 2}]}',
            "levelVersion",
        ),
        (
            b'{"shipmentId": "S", "orderId": "' + ORDER.encode() + b'", "warehouse": "main",'
            b' "lines": [{"sku": "MUG-1", "quantity": 2, "levelVersion": 1, "lot": "A"}]}',
            "lot",
        ),
    ],
)
def test_malformed_shipments_are_refused(data: bytes, because: str) -> None:
    with pytest.raises(WarehouseMessageRefused, match=because):
        parse_shipment(data)
