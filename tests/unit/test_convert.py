"""Domain objects to protobuf: what callers see of an order's deadline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from server.api.convert import order, timestamp
from server.domain.money import Money
from server.domain.orders import Order, OrderLine, OrderStatus

PLACED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DEADLINE = PLACED + timedelta(minutes=15)


def _order(status: OrderStatus) -> Order:
    line = OrderLine("p-1", "MUG", 2, Money("USD", Decimal("12.50")))
    return Order(
        id="o-1",
        customer_id="alice",
        status=status,
        lines=(line,),
        total=line.line_total,
        create_time=PLACED,
        update_time=PLACED,
        expire_time=DEADLINE,
    )


@pytest.mark.parametrize("status", [OrderStatus.PENDING_PAYMENT, OrderStatus.EXPIRED])
def test_an_order_that_awaits_or_missed_payment_shows_its_deadline(status: OrderStatus) -> None:
    message = order(_order(status))
    assert message.HasField("expire_time")
    assert message.expire_time.ToDatetime(tzinfo=UTC) == DEADLINE


@pytest.mark.parametrize("status", [OrderStatus.PAID, OrderStatus.CANCELLED, OrderStatus.REFUNDED])
def test_a_settled_order_has_no_deadline(status: OrderStatus) -> None:
    message = order(_order(status))
    assert not message.HasField("expire_time")
    assert message.total.units == 25


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1900, 3, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 12, 1, 13, 0, tzinfo=timezone(timedelta(hours=1, minutes=30))),
        datetime(2026, 12, 1, 12, 0, 0, 500000),  # naive: read as UTC
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_timestamps_are_what_protobuf_itself_would_make(moment: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(moment)
    assert timestamp(moment) == expected
