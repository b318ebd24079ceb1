"""The payment decisions the services apply, without I/O: settling a charge, completing a
refund, validating a cancel."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from server.domain.errors import InvalidArgument
from server.domain.money import Money
from server.domain.orders import OrderStatus, automatic_cancel_request_id, cancel_request
from server.domain.payments import (
    ChargeOutcome,
    IntentStatus,
    Payment,
    PaymentStatus,
    SettlementPlan,
    refund_completion,
    revives,
    settlement,
)

pytestmark = pytest.mark.unit

ORDER_ID = "0b6c9a9e-3f43-4c1c-9f1e-0c1d2e3f4a5b"
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
TEN = Money("USD", Decimal("10.00"))


def payment(status: PaymentStatus = PaymentStatus.PENDING, refunded: str = "0") -> Payment:
    return Payment(
        id="7d3f4a5b-0b6c-4c1c-9f1e-0c1d2e3f4a5b",
        order_id=ORDER_ID,
        customer_id="alice",
        status=status,
        amount=TEN,
        amount_refunded=Money("USD", Decimal(refunded)),
        provider="stripe",
        provider_reference="pi_1",
        failure_code="",
        failure_message="",
        create_time=NOW,
        update_time=NOW,
    )


SUCCEEDED = ChargeOutcome(IntentStatus.SUCCEEDED, TEN)


def test_a_success_pays_a_pending_order() -> None:
    plan = settlement(payment(), OrderStatus.PENDING_PAYMENT, SUCCEEDED)
    assert plan == SettlementPlan(settle_as=PaymentStatus.SUCCEEDED, order_status=OrderStatus.PAID)


@pytest.mark.parametrize("status", [PaymentStatus.SUCCEEDED, PaymentStatus.REFUNDED])
def test_a_settled_payment_is_left_alone(status: PaymentStatus) -> None:
    assert settlement(payment(status), OrderStatus.PAID, SUCCEEDED) == SettlementPlan()


def test_a_failure_keeps_the_providers_reason_or_says_declined() -> None:
    told = ChargeOutcome(IntentStatus.FAILED, None, "card_declined", "Your card was declined.")
    plan = settlement(payment(), OrderStatus.PENDING_PAYMENT, told)
    assert (plan.settle_as, plan.failure_code, plan.failure_message) == (
        PaymentStatus.FAILED,
        "card_declined",
        "Your card was declined.",
    )
    silent = settlement(
        payment(), OrderStatus.PENDING_PAYMENT, ChargeOutcome(IntentStatus.FAILED, None)
    )
    assert (silent.failure_code, silent.failure_message) == (
        "payment_failed",
        "the provider declined the payment",
    )
    assert silent.order_status is None


@pytest.mark.parametrize("status", [IntentStatus.PROCESSING, IntentStatus.REQUIRES_CONFIRMATION])
def test_an_undecided_charge_is_asked_about_again(status: IntentStatus) -> None:
    plan = settlement(payment(), OrderStatus.PENDING_PAYMENT, ChargeOutcome(status, None))
    assert plan == SettlementPlan(recheck_later=True)


def test_a_charge_of_another_amount_never_pays_the_order() -> None:
    short = ChargeOutcome(IntentStatus.SUCCEEDED, Money("USD", Decimal("9.99")))
    plan = settlement(payment(), OrderStatus.PENDING_PAYMENT, short)
    assert plan.recheck_later
    assert plan.settle_as is None
    assert plan.order_status is None
    assert plan.alarm


@pytest.mark.parametrize("order_status", [OrderStatus.EXPIRED, OrderStatus.CANCELLED])
def test_money_for_an_order_that_cannot_take_it_is_given_back(order_status: OrderStatus) -> None:
    plan = settlement(payment(), order_status, SUCCEEDED)
    assert plan.settle_as is PaymentStatus.SUCCEEDED
    assert plan.refund_in_full
    assert plan.order_status is None
    assert plan.alarm


def test_a_failed_payment_charged_after_all_is_reopened_and_pays_the_order() -> None:
    failed = payment(PaymentStatus.FAILED)
    assert revives(failed, SUCCEEDED)
    plan = settlement(failed, OrderStatus.PENDING_PAYMENT, SUCCEEDED)
    assert plan.reopen
    assert plan.settle_as is PaymentStatus.SUCCEEDED
    assert plan.order_status is OrderStatus.PAID


def test_a_failed_payment_charged_while_another_is_live_is_only_reported() -> None:
    plan = settlement(
        payment(PaymentStatus.FAILED), OrderStatus.PAID, SUCCEEDED, other_live_payment=True
    )
    assert not plan.reopen
    assert plan.settle_as is None
    assert plan.alarm


def test_only_a_charge_revives_a_failed_payment() -> None:
    assert not revives(payment(PaymentStatus.FAILED), ChargeOutcome(IntentStatus.FAILED, None))
    assert not revives(payment(), SUCCEEDED)
    assert (
        settlement(
            payment(PaymentStatus.FAILED),
            OrderStatus.PENDING_PAYMENT,
            ChargeOutcome(IntentStatus.PROCESSING, None),
        )
        == SettlementPlan()
    )


def test_a_partial_refund_leaves_the_order_alone() -> None:
    done = refund_completion(
        payment(PaymentStatus.SUCCEEDED),
        Money("USD", Decimal("4")),
        OrderStatus.PAID,
        cancels_order=False,
    )
    assert done.payment_status is PaymentStatus.PARTIALLY_REFUNDED
    assert done.order_status is None
    assert not done.releases_stock


@pytest.mark.parametrize(
    ("cancels", "target"), [(True, OrderStatus.CANCELLED), (False, OrderStatus.REFUNDED)]
)
def test_a_refund_that_empties_a_paid_orders_payment_ends_the_order(
    cancels: bool, target: OrderStatus
) -> None:
    paid = payment(PaymentStatus.PARTIALLY_REFUNDED, refunded="4")
    done = refund_completion(
        paid, Money("USD", Decimal("6")), OrderStatus.PAID, cancels_order=cancels
    )
    assert done.payment_status is PaymentStatus.REFUNDED
    assert done.order_status is target
    assert done.releases_stock
    assert done.cancels_order is cancels


@pytest.mark.parametrize("cancels", [True, False])
def test_a_refund_of_a_shipped_order_gives_money_back_not_stock(cancels: bool) -> None:
    # cancels: a cancellation's refund the shipment overtook; the goods left, so REFUNDED.
    done = refund_completion(
        payment(PaymentStatus.SUCCEEDED), TEN, OrderStatus.SHIPPED, cancels_order=cancels
    )
    assert done.payment_status is PaymentStatus.REFUNDED
    assert done.order_status is OrderStatus.REFUNDED
    assert not done.releases_stock
    assert not done.cancels_order


def test_a_full_refund_of_an_order_no_longer_paid_moves_no_stock() -> None:
    done = refund_completion(
        payment(PaymentStatus.SUCCEEDED), TEN, OrderStatus.EXPIRED, cancels_order=False
    )
    assert done.payment_status is PaymentStatus.REFUNDED
    assert done.order_status is None
    assert not done.releases_stock


def test_a_cancel_request_is_validated_in_the_domain() -> None:
    request = cancel_request(ORDER_ID.upper(), "")
    assert request.order_id == ORDER_ID
    assert request.refund_request_id() == automatic_cancel_request_id(ORDER_ID)
    assert replace(request, request_id="c-1").refund_request_id() == "c-1"
    with pytest.raises(InvalidArgument) as refused:
        cancel_request("not-a-uuid", "bad request id!")
    assert [v.field for v in refused.value.violations] == ["id", "request_id"]
