"""Payment use cases on a real PostgreSQL and localstripe behind the fault-injecting Envoy,
without our gRPC server: the steps that must survive a provider outage or a crash between
them, and the reconciler that finishes them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from devstack.localstripe import DECLINED_CARD, SUCCESS_CARD
from server.adapters.stripe_provider import StripeProvider
from server.db.driver import DriverPool
from server.domain.errors import RequestIdReused
from server.domain.identity import Principal, Role
from server.domain.money import Money
from server.domain.orders import OrderStatus, cancel_request, order_request
from server.domain.payments import (
    Payment,
    PaymentStatus,
    RefundStatus,
    payment_request,
    refund_request,
)
from server.services.circuit import CircuitOpen, GuardedProvider
from server.services.providers import (
    IntentStatus,
    ProviderIntent,
    ProviderRefund,
    ProviderUnavailable,
)
from server.services.upkeep import Upkeep
from tests.conftest import insert_product, stock_of
from tests.stack import Stack, running_stack
from tests.use_cases import wired

pytestmark = pytest.mark.integration

# localstripe's test card that asks for 3-D Secure when charged
AUTHENTICATION_CARD = "4000002500003155"

ADMIN = Principal("root", frozenset({Role.ADMIN}))


@pytest.fixture(scope="module")
def payment_stack() -> Iterator[Stack]:
    with running_stack() as stack:
        yield stack


class World:
    """Payments wired as the server wires them, with a lease of 0 so the reconciler may
    take over at once (the test plays the crash)."""

    def __init__(self, engine: AsyncEngine, hot_path: DriverPool, stack: Stack) -> None:
        self.stack = stack
        self.stripe = StripeProvider(
            api_key="sk_test_marketplace",
            api_base=stack.api_base,
            timeout_seconds=1,
            max_attempts=2,
        )
        self.provider = GuardedProvider(self.stripe, threshold=3, reset_seconds=1)
        # Products the use cases report changed, for the server's product cache.
        self.changed: list[str] = []
        use_cases = wired(
            engine,
            hot_path,
            self.provider,
            lease_seconds=0,
            recheck_seconds=0,
            products_changed=self.changed.extend,
        )
        self.placement = use_cases.placement
        self.cancellation = use_cases.cancellation
        self.charging = use_cases.charging
        self.settlement = use_cases.settlement
        self.refunds = use_cases.refunds
        self.payment_reads = use_cases.payment_reads
        # Its own lease of 60 s: a row it claims is not claimed again within one pass.
        self.upkeep = Upkeep(
            engine, self.settlement, self.refunds, self.provider, batch_size=10, lease_seconds=60
        )

    async def paid_order(
        self, database_url: str, *, stock: int = 10
    ) -> tuple[Principal, str, str, str]:
        """A customer, a product, the customer's order of 2 units and its succeeded payment."""
        customer, product, order_id, payment = await self.order_paid_with(
            database_url, SUCCESS_CARD, stock=stock
        )
        assert payment.status is PaymentStatus.SUCCEEDED
        return customer, product, order_id, payment.id

    async def order_paid_with(
        self, database_url: str, card_number: str, *, stock: int = 10
    ) -> tuple[Principal, str, str, Payment]:
        """A new customer's order of 2 x 12.50 of a new product, and a payment of it with a
        localstripe test card: the customer, product id, order id and payment."""
        product = insert_product(database_url, stock=stock, price="12.50")
        customer = Principal(f"saga-{uuid.uuid4().hex[:8]}", frozenset({Role.CUSTOMER}))
        order = await self.placement.place_order(
            customer.subject, order_request(f"o-{uuid.uuid4()}", [(product, 2)])
        )
        card = await self.stack.localstripe.payment_method(card_number)
        payment = await self.charging.create_payment(
            customer, payment_request(order.id, f"p-{uuid.uuid4()}", card)
        )
        return customer, product, order.id, payment


@pytest.fixture
async def world(
    engine: AsyncEngine, hot_path: DriverPool, payment_stack: Stack
) -> AsyncIterator[World]:
    built = World(engine, hot_path, payment_stack)
    yield built
    await payment_stack.faults.clear()
    await built.stripe.aclose()


def _order_status(database_url: str, order_id: str) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT status FROM orders WHERE id = %s", (order_id,)).fetchone()
    assert row is not None
    status: str = row[0]
    return status


async def _refunded_at_provider(stack: Stack, order_id: str) -> int:
    [intent] = [
        i for i in await stack.localstripe.intents_for_order(order_id) if i["status"] == "succeeded"
    ]
    return sum(refund["amount"] for refund in await stack.localstripe.refunds_for(intent["id"]))


async def test_a_cancellation_cut_short_by_an_outage_is_finished_by_the_reconciler(
    world: World, database_url: str
) -> None:
    customer, product, order_id, payment_id = await world.paid_order(database_url)
    await world.stack.faults.abort(503)
    with pytest.raises(ProviderUnavailable):
        await world.cancellation.cancel_order(customer, cancel_request(order_id, "cancel-1"))
    # The saga's first step is stored; nothing was refunded or released yet.
    assert _order_status(database_url, order_id) == OrderStatus.PAID.value
    assert stock_of(database_url, product) == 8
    assert await _refunded_at_provider(world.stack, order_id) == 0

    await world.stack.faults.clear()
    assert await world.upkeep.reconcile_refunds() == 1
    assert _order_status(database_url, order_id) == OrderStatus.CANCELLED.value
    assert stock_of(database_url, product) == 10
    assert await _refunded_at_provider(world.stack, order_id) == 2500
    payment = await world.payment_reads.get_payment(ADMIN, payment_id)
    assert payment.status is PaymentStatus.REFUNDED
    # A retry of the cancel, and another reconciler pass, change nothing more.
    again = await world.cancellation.cancel_order(customer, cancel_request(order_id, "cancel-1"))
    assert again.status is OrderStatus.CANCELLED
    assert await world.upkeep.reconcile_refunds() == 0
    assert stock_of(database_url, product) == 10
    assert await _refunded_at_provider(world.stack, order_id) == 2500


async def _refunded_by_a_sender_that_died(
    world: World,
    database_url: str,
    refund_id: uuid.UUID,
    payment_id: str,
    request_id: str,
    fingerprint: str,
    *,
    cancels: bool,
) -> ProviderRefund:
    """A PENDING refund of the 25.00 payment, by ADMIN, whose lease has run out, and the
    refund its sender made at the provider before dying."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            """
            INSERT INTO refunds (id, payment_id, actor, request_id, request_fingerprint,
                                 currency, amount, reason, cancels_order, status,
                                 next_check_time)
            VALUES (%s, %s, %s, %s, %s, 'USD', 25, 'crashed', %s, 'PENDING', now())
            """,
            (refund_id, payment_id, ADMIN.subject, request_id, fingerprint, cancels),
        )
        reference = conn.execute(
            "SELECT provider_reference FROM payments WHERE id = %s", (payment_id,)
        ).fetchone()
    assert reference is not None
    return await world.stripe.refund(
        reference[0],
        amount_minor=2500,
        metadata={"refund_id": str(refund_id)},
        idempotency_key=str(refund_id),
    )


async def test_a_refund_made_at_the_provider_but_not_recorded_is_applied_not_repeated(
    world: World, database_url: str
) -> None:
    """The crash between Stripe's refund and our commit: the refund row is PENDING, Stripe
    has the refund (found by its metadata), and the reconciler applies it once."""
    _, product, order_id, payment_id = await world.paid_order(database_url)
    refund_id = uuid.uuid4()
    made = await _refunded_by_a_sender_that_died(
        world, database_url, refund_id, payment_id, f"crash-{refund_id}", "0" * 64, cancels=True
    )
    assert made.status is RefundStatus.SUCCEEDED
    assert await world.upkeep.reconcile_refunds() == 1
    assert await _refunded_at_provider(world.stack, order_id) == 2500  # not refunded twice
    assert _order_status(database_url, order_id) == OrderStatus.CANCELLED.value
    assert stock_of(database_url, product) == 10


async def test_partial_then_full_refund_restocks_once(world: World, database_url: str) -> None:
    _, product, order_id, payment_id = await world.paid_order(database_url)
    partial = await world.refunds.refund_payment(
        ADMIN, refund_request(payment_id, "r-part", Money("USD", Decimal("5")), [], "dent")
    )
    assert partial.status is PaymentStatus.PARTIALLY_REFUNDED
    assert _order_status(database_url, order_id) == OrderStatus.PAID.value
    assert stock_of(database_url, product) == 8
    full = await world.refunds.refund_payment(
        ADMIN, refund_request(payment_id, "r-rest", None, [], "")
    )
    assert full.status is PaymentStatus.REFUNDED
    assert full.amount_refunded.amount == Decimal("25")
    assert _order_status(database_url, order_id) == OrderStatus.REFUNDED.value
    assert stock_of(database_url, product) == 10
    replay = await world.refunds.refund_payment(
        ADMIN, refund_request(payment_id, "r-rest", None, [], "")
    )
    assert replay == full
    assert await _refunded_at_provider(world.stack, order_id) == 2500


async def test_the_circuit_opens_and_refuses_without_writing(
    world: World, database_url: str
) -> None:
    product = insert_product(database_url, stock=10)
    customer = Principal(f"circuit-{uuid.uuid4().hex[:8]}", frozenset({Role.CUSTOMER}))
    card = await world.stack.localstripe.payment_method(SUCCESS_CARD)
    await world.stack.faults.abort(503)
    failures = 0
    with pytest.raises(CircuitOpen) as opened:  # noqa: PT012 - the loop is the arrangement
        for attempt in range(5):
            order = await world.placement.place_order(
                customer.subject, order_request(f"c-{attempt}", [(product, 1)])
            )
            try:
                await world.charging.create_payment(
                    customer, payment_request(order.id, f"pay-{attempt}", card)
                )
            except CircuitOpen:
                raise
            except ProviderUnavailable:
                failures += 1
    assert failures == 3
    assert opened.value.retry_after_seconds <= 1
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM payments WHERE customer_id = %s", (customer.subject,)
        ).fetchone()
    assert rows == (3,)  # the refused attempt wrote nothing


async def _declined_then(world: World, database_url: str) -> tuple[Principal, str, str, str]:
    """A customer's order of 2 x 12.50 and a payment of it recorded FAILED (declined)."""
    customer, product, order_id, failed = await world.order_paid_with(database_url, DECLINED_CARD)
    assert failed.status is PaymentStatus.FAILED
    return customer, product, order_id, failed.id


def _late_success(payment_id: str) -> ProviderIntent:
    """The provider's later word that it charged the order's 25.00 after all."""
    return ProviderIntent(
        reference=f"pi_late_{payment_id[:8]}",
        status=IntentStatus.SUCCEEDED,
        amount_minor=2500,
        currency="USD",
    )


async def test_a_payment_recorded_failed_that_the_provider_charged_pays_the_order(
    world: World, database_url: str
) -> None:
    _, product, order_id, payment_id = await _declined_then(world, database_url)

    settled = await world.settlement.settle_payment(
        uuid.UUID(payment_id), _late_success(payment_id)
    )

    assert settled.status is PaymentStatus.SUCCEEDED
    assert _order_status(database_url, order_id) == "PAID"
    assert stock_of(database_url, product) == 8


async def test_a_late_charge_of_a_failed_payment_never_makes_a_second_live_payment(
    world: World, database_url: str
) -> None:
    customer, product, order_id, payment_id = await _declined_then(world, database_url)
    card = await world.stack.localstripe.payment_method(SUCCESS_CARD)
    paid = await world.charging.create_payment(
        customer, payment_request(order_id, f"p-{uuid.uuid4()}", card)
    )
    assert paid.status is PaymentStatus.SUCCEEDED

    settled = await world.settlement.settle_payment(
        uuid.UUID(payment_id), _late_success(payment_id)
    )

    # Left for an operator (logged as a double charge); nothing here may break the paid order.
    assert settled.status is PaymentStatus.FAILED
    assert _order_status(database_url, order_id) == "PAID"
    assert stock_of(database_url, product) == 8


async def test_a_charge_waiting_on_3d_secure_past_the_window_is_cancelled_and_the_order_expires(
    engine: AsyncEngine, hot_path: DriverPool, world: World, database_url: str
) -> None:
    quick = wired(
        engine,
        hot_path,
        world.provider,
        payment_window_seconds=1,
        lease_seconds=0,
        recheck_seconds=0,
    )
    upkeep = Upkeep(
        engine, quick.settlement, quick.refunds, world.provider, batch_size=50, lease_seconds=60
    )
    product = insert_product(database_url, stock=10, price="12.50")
    customer = Principal(f"3ds-{uuid.uuid4().hex[:8]}", frozenset({Role.CUSTOMER}))
    order = await quick.placement.place_order(
        customer.subject, order_request(f"o-{uuid.uuid4()}", [(product, 2)])
    )
    card = await world.stack.localstripe.payment_method(AUTHENTICATION_CARD)
    waiting = await quick.charging.create_payment(
        customer, payment_request(order.id, f"p-{uuid.uuid4()}", card)
    )
    # The customer never authenticates: the payment waits, and holds the order.
    assert waiting.status is PaymentStatus.PENDING
    assert await upkeep.expire_orders() == 0

    # The order's own deadline, set by the database; same machine, same clock.
    await asyncio.sleep(max(0.0, (order.expire_time - datetime.now(UTC)).total_seconds()) + 0.1)
    while await upkeep.reconcile_payments():
        pass
    settled = await quick.payment_reads.get_payment(customer, waiting.id)
    assert settled.status is PaymentStatus.FAILED
    [intent] = await world.stack.localstripe.intents_for_order(order.id)
    assert intent["status"] == "canceled"
    assert await upkeep.expire_orders() >= 1
    assert _order_status(database_url, order.id) == "EXPIRED"
    assert stock_of(database_url, product) == 10


async def test_a_cancel_request_id_held_by_a_paid_orders_refunding_cancellation_is_taken(
    world: World, database_url: str
) -> None:
    customer, _, paid_id, _ = await world.paid_order(database_url)
    other = insert_product(database_url, stock=5)
    pending = await world.placement.place_order(
        customer.subject, order_request(f"o-{uuid.uuid4()}", [(other, 1)])
    )
    await world.stack.faults.abort(503)
    with pytest.raises(ProviderUnavailable):
        await world.cancellation.cancel_order(customer, cancel_request(paid_id, "cancel-shared"))
    await world.stack.faults.clear()

    # The paid order's cancellation holds "cancel-shared" while its refund is pending: the
    # pending order may not take it (else the refund could never be applied).
    with pytest.raises(RequestIdReused):
        await world.cancellation.cancel_order(customer, cancel_request(pending.id, "cancel-shared"))
    assert _order_status(database_url, pending.id) == OrderStatus.PENDING_PAYMENT.value

    assert await world.upkeep.reconcile_refunds() == 1
    assert _order_status(database_url, paid_id) == OrderStatus.CANCELLED.value
    with pytest.raises(RequestIdReused):
        await world.cancellation.cancel_order(customer, cancel_request(pending.id, "cancel-shared"))


async def test_a_paid_orders_cancellation_reports_its_products_once_their_stock_is_back(
    world: World, database_url: str
) -> None:
    customer, product, order_id, _ = await world.paid_order(database_url)
    world.changed.clear()
    cancelled = await world.cancellation.cancel_order(
        customer, cancel_request(order_id, f"c-{uuid.uuid4()}")
    )
    assert cancelled.status is OrderStatus.CANCELLED
    assert stock_of(database_url, product) == 10
    assert world.changed == [product]


async def test_retries_of_a_refund_whose_sender_died_after_the_provider_made_it_apply_it_once(
    engine: AsyncEngine, hot_path: DriverPool, world: World, database_url: str
) -> None:
    """The sender died between the provider's refund and our commit, and its lease ran out:
    concurrent retries of its request and the reconciler take it over, one of them finds the
    refund at the provider by its metadata, and nobody sends it again."""
    _, product, order_id, payment_id = await world.paid_order(database_url)
    request = refund_request(payment_id, f"died-{uuid.uuid4()}", None, [], "sender died")
    await _refunded_by_a_sender_that_died(
        world,
        database_url,
        uuid.uuid4(),
        payment_id,
        request.request_id,
        request.fingerprint(),
        cancels=False,
    )
    # The World's lease of 0 would let every taker in at once; the server's is positive.
    patient = wired(engine, hot_path, world.provider, lease_seconds=30, recheck_seconds=0)
    upkeep = Upkeep(
        engine, patient.settlement, patient.refunds, world.provider, batch_size=50, lease_seconds=30
    )

    *answers, _ = await asyncio.gather(
        *(patient.refunds.refund_payment(ADMIN, request) for _ in range(10)),
        upkeep.reconcile_refunds(),
    )

    assert {(a.status, a.amount_refunded.amount) for a in answers} == {
        (PaymentStatus.REFUNDED, Decimal("25"))
    }
    assert await _refunded_at_provider(world.stack, order_id) == 2500
    assert _order_status(database_url, order_id) == OrderStatus.REFUNDED.value
    assert stock_of(database_url, product) == 10
