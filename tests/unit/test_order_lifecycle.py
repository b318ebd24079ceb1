"""The order state machine and the payment rules, without I/O."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from server.domain.errors import FailedPrecondition, InvalidArgument
from server.domain.money import Money
from server.domain.orders import (
    Cancellation,
    OrderEvent,
    OrderStatus,
    cancellation,
    check_payable,
    next_status,
    releases_stock,
)
from server.domain.payments import (
    Payment,
    PaymentStatus,
    from_minor_units,
    payment_request,
    refund_amount,
    refund_request,
    status_after_refund,
    to_minor_units,
)

pytestmark = pytest.mark.unit

ORDER_ID = "0b6c9a9e-3f43-4c1c-9f1e-0c1d2e3f4a5b"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_every_allowed_transition() -> None:
    allowed = {}
    for status in OrderStatus:
        for event in OrderEvent:
            with contextlib.suppress(FailedPrecondition):
                allowed[(status, event)] = next_status("o-1", status, event)
    assert allowed == {
        (OrderStatus.PENDING_PAYMENT, OrderEvent.PAYMENT_SUCCEEDED): OrderStatus.PAID,
        (OrderStatus.PENDING_PAYMENT, OrderEvent.PAYMENT_WINDOW_CLOSED): OrderStatus.EXPIRED,
        (OrderStatus.PENDING_PAYMENT, OrderEvent.CANCELLED): OrderStatus.CANCELLED,
        (OrderStatus.PAID, OrderEvent.CANCELLED): OrderStatus.CANCELLED,
        (OrderStatus.PAID, OrderEvent.REFUNDED_IN_FULL): OrderStatus.REFUNDED,
        (OrderStatus.PAID, OrderEvent.SHIPPED): OrderStatus.SHIPPED,
        (OrderStatus.SHIPPED, OrderEvent.REFUNDED_IN_FULL): OrderStatus.REFUNDED,
    }


def test_refused_cancel_names_the_status() -> None:
    with pytest.raises(FailedPrecondition) as raised:
        next_status("o-1", OrderStatus.EXPIRED, OrderEvent.CANCELLED)
    assert raised.value.reason == "ORDER_NOT_CANCELLABLE"
    assert raised.value.metadata["status"] == "EXPIRED"


def test_paying_twice_is_an_invalid_transition() -> None:
    with pytest.raises(FailedPrecondition) as raised:
        next_status("o-1", OrderStatus.PAID, OrderEvent.PAYMENT_SUCCEEDED)
    assert raised.value.reason == "INVALID_ORDER_TRANSITION"


def test_stock_comes_back_exactly_when_an_order_stops_holding_it() -> None:
    released = {
        (current, target)
        for current in OrderStatus
        for target in OrderStatus
        if releases_stock(current, target)
    }
    holding = {OrderStatus.PENDING_PAYMENT, OrderStatus.PAID}
    ended = {OrderStatus.CANCELLED, OrderStatus.EXPIRED, OrderStatus.REFUNDED}
    assert released == {(current, target) for current in holding for target in ended}
    # and every allowed transition into an ended status releases once
    assert releases_stock(OrderStatus.PAID, OrderStatus.REFUNDED)
    assert not releases_stock(OrderStatus.PENDING_PAYMENT, OrderStatus.PAID)
    assert not releases_stock(OrderStatus.CANCELLED, OrderStatus.CANCELLED)
    # shipping ends the holding too, but the units left with the shipment
    assert not releases_stock(OrderStatus.PAID, OrderStatus.SHIPPED)
    assert not releases_stock(OrderStatus.SHIPPED, OrderStatus.REFUNDED)


def test_a_shipped_order_cannot_be_cancelled() -> None:
    with pytest.raises(FailedPrecondition) as raised:
        cancellation("o-1", OrderStatus.SHIPPED)
    assert raised.value.reason == "ORDER_NOT_CANCELLABLE"


@pytest.mark.parametrize(
    ("status", "plan"),
    [
        (OrderStatus.PENDING_PAYMENT, Cancellation.RELEASE_NOW),
        (OrderStatus.PAID, Cancellation.REFUND_FIRST),
        (OrderStatus.CANCELLED, Cancellation.NOTHING),
    ],
)
def test_cancellation_plan(status: OrderStatus, plan: Cancellation) -> None:
    assert cancellation("o-1", status) is plan


@pytest.mark.parametrize("status", [OrderStatus.EXPIRED, OrderStatus.REFUNDED])
def test_ended_orders_cannot_be_cancelled(status: OrderStatus) -> None:
    with pytest.raises(FailedPrecondition) as raised:
        cancellation("o-1", status)
    assert raised.value.reason == "ORDER_NOT_CANCELLABLE"


def test_pending_order_inside_its_window_is_payable() -> None:
    check_payable("o-1", OrderStatus.PENDING_PAYMENT, NOW + timedelta(seconds=1), NOW)


@pytest.mark.parametrize(
    ("status", "expires_in", "shown"),
    [
        (OrderStatus.PENDING_PAYMENT, timedelta(0), "EXPIRED"),
        (OrderStatus.PAID, timedelta(minutes=5), "PAID"),
        (OrderStatus.CANCELLED, timedelta(minutes=5), "CANCELLED"),
        (OrderStatus.EXPIRED, timedelta(minutes=-5), "EXPIRED"),
    ],
)
def test_order_not_payable(status: OrderStatus, expires_in: timedelta, shown: str) -> None:
    with pytest.raises(FailedPrecondition) as raised:
        check_payable("o-1", status, NOW + expires_in, NOW)
    assert raised.value.reason == "ORDER_NOT_PAYABLE"
    assert raised.value.metadata == {"orderId": "o-1", "status": shown}


def test_payment_request_validation_lists_every_problem() -> None:
    with pytest.raises(InvalidArgument) as raised:
        payment_request("not-a-uuid", "", "4242424242424242")
    fields = [v.field for v in raised.value.violations]
    assert fields == ["order_id", "request_id", "payment_method"]
    assert "card numbers are never accepted" in raised.value.violations[2].description


def test_payment_request_fingerprint_covers_the_method() -> None:
    first = payment_request(ORDER_ID, "r-1", "pm_card_a")
    same = payment_request(ORDER_ID, "r-1", "pm_card_a")
    other = payment_request(ORDER_ID, "r-1", "pm_card_b")
    assert first.fingerprint() == same.fingerprint() != other.fingerprint()


@pytest.mark.parametrize(
    ("money", "minor"),
    [
        (Money("USD", Decimal("12.50")), 1250),
        (Money("JPY", Decimal("500")), 500),
        (Money("KWD", Decimal("1.234")), 1234),
    ],
)
def test_minor_units_round_trip(money: Money, minor: int) -> None:
    assert to_minor_units(money) == minor
    assert from_minor_units(money.currency, minor) == money


def test_fractions_of_a_cent_cannot_be_charged() -> None:
    with pytest.raises(FailedPrecondition) as raised:
        to_minor_units(Money("USD", Decimal("0.001")))
    assert raised.value.reason == "AMOUNT_NOT_CHARGEABLE"


def _payment(status: PaymentStatus, refunded: str = "0") -> Payment:
    return Payment(
        id="p-1",
        order_id=ORDER_ID,
        customer_id="alice",
        status=status,
        amount=Money("USD", Decimal("30.00")),
        amount_refunded=Money("USD", Decimal(refunded)),
        provider="stripe",
        provider_reference="pi_1",
        failure_code="",
        failure_message="",
        create_time=NOW,
        update_time=NOW,
    )


def test_omitted_refund_amount_is_everything_left() -> None:
    payment = _payment(PaymentStatus.PARTIALLY_REFUNDED, refunded="10.00")
    assert refund_amount(payment, None) == Money("USD", Decimal("20.00"))


def test_refund_over_what_is_left_is_refused() -> None:
    payment = _payment(PaymentStatus.PARTIALLY_REFUNDED, refunded="25.00")
    with pytest.raises(FailedPrecondition) as raised:
        refund_amount(payment, Money("USD", Decimal("5.01")))
    assert raised.value.reason == "REFUND_EXCEEDS_PAYMENT"
    assert raised.value.metadata["refundable"] == "5.00"


def test_refund_in_another_currency_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as raised:
        refund_amount(_payment(PaymentStatus.SUCCEEDED), Money("EUR", Decimal("1")))
    assert raised.value.violations[0].field == "amount.currency_code"


@pytest.mark.parametrize(
    "status", [PaymentStatus.PENDING, PaymentStatus.FAILED, PaymentStatus.REFUNDED]
)
def test_only_money_taken_can_be_refunded(status: PaymentStatus) -> None:
    with pytest.raises(FailedPrecondition) as raised:
        refund_amount(_payment(status), None)
    assert raised.value.reason == "PAYMENT_NOT_REFUNDABLE"


def test_status_after_partial_and_full_refunds() -> None:
    payment = _payment(PaymentStatus.SUCCEEDED)
    assert (
        status_after_refund(payment, Money("USD", Decimal("10")))
        is PaymentStatus.PARTIALLY_REFUNDED
    )
    assert status_after_refund(payment, Money("USD", Decimal("30"))) is PaymentStatus.REFUNDED
    partly = _payment(PaymentStatus.PARTIALLY_REFUNDED, refunded="10.00")
    assert status_after_refund(partly, Money("USD", Decimal("20"))) is PaymentStatus.REFUNDED


def test_refund_request_validation() -> None:
    with pytest.raises(InvalidArgument) as raised:
        refund_request("x", "", Money("USD", Decimal("-1")), [], "ok")
    assert [v.field for v in raised.value.violations] == ["id", "request_id", "amount"]
    with pytest.raises(InvalidArgument) as raised:
        refund_request(ORDER_ID, "r-1", Money("USD", Decimal("0.005")), [], "")
    assert "smallest unit" in raised.value.violations[0].description
    with pytest.raises(InvalidArgument) as raised:
        refund_request(ORDER_ID, "r-1", None, ["currency_code 'XXQ' is not an ISO 4217 code"], "")
    assert raised.value.violations[0].field == "amount"
