"""Domain objects to protobuf: what callers see of an order's deadline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from server.api.convert import order
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
