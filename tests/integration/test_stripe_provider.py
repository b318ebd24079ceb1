"""The Stripe adapter against localstripe, reached through Envoy's fault-injecting egress
listener: what it reports, and what it leaves behind at the provider when the network fails.

The evidence comes from localstripe's own port and Envoy's counters, never through the
adapter under test. localstripe ignores idempotency keys, so a retry that repeated a charge
or a refund would show up here as a second one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from devstack.localstripe import DECLINED_CARD, SUCCESS_CARD
from server.adapters.stripe_provider import StripeProvider
from server.domain.payments import RefundStatus
from server.services.providers import (
    CardDeclined,
    IntentStatus,
    PaymentUnknownToProvider,
    ProviderIntent,
    ProviderOutcomeUnknown,
    ProviderUnavailable,
)
from tests.conftest import eventually
from tests.stack import FaultInjector, LocalStripe, Stack, running_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TIMEOUT_SECONDS = 0.5
MAX_ATTEMPTS = 3
# A refund's answer is small; padded metadata makes it take ~1 s at the throttled 1 KiB/s,
# well past the timeout, so the answer is lost although the refund was made.
PADDING = {"padding_a": "a" * 450, "padding_b": "b" * 450}

MakeProvider = Callable[..., StripeProvider]


@pytest.fixture(scope="module")
def payment_stack() -> Iterator[Stack]:
    with running_stack() as stack:
        yield stack


@pytest.fixture
async def faults(payment_stack: Stack) -> AsyncIterator[FaultInjector]:
    injector = payment_stack.faults
    await injector.clear()
    yield injector
    await injector.clear()


@pytest.fixture
def localstripe(payment_stack: Stack) -> LocalStripe:
    return payment_stack.localstripe


@pytest.fixture
async def make_provider(payment_stack: Stack) -> AsyncIterator[MakeProvider]:
    made: list[StripeProvider] = []

    def make(*, max_attempts: int = MAX_ATTEMPTS) -> StripeProvider:
        provider = StripeProvider(
            api_key="sk_test_integration",
            api_base=payment_stack.api_base,
            timeout_seconds=TIMEOUT_SECONDS,
            max_attempts=max_attempts,
        )
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


@pytest.fixture
def provider(make_provider: MakeProvider) -> StripeProvider:
    return make_provider()


def new_key() -> str:
    return str(uuid.uuid4())


async def create_intent(
    provider: StripeProvider,
    localstripe: LocalStripe,
    *,
    order_id: str,
    card: str = SUCCESS_CARD,
    amount_minor: int = 1250,
) -> ProviderIntent:
    return await provider.create_intent(
        amount_minor=amount_minor,
        currency="EUR",
        payment_method=await localstripe.payment_method(card),
        metadata={"order_id": order_id},
        idempotency_key=new_key(),
    )


async def paid_intent(
    provider: StripeProvider, localstripe: LocalStripe, *, amount_minor: int = 1000
) -> ProviderIntent:
    created = await create_intent(
        provider, localstripe, order_id=new_key(), amount_minor=amount_minor
    )
    paid = await provider.confirm_intent(created.reference, idempotency_key=new_key())
    assert paid.status is IntentStatus.SUCCEEDED
    return paid


# --- plain outcomes --------------------------------------------------------------------


async def test_a_good_card_is_charged_once(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    order_id = new_key()
    created = await create_intent(provider, localstripe, order_id=order_id, amount_minor=1999)
    assert created.status is IntentStatus.REQUIRES_CONFIRMATION
    assert (created.amount_minor, created.currency) == (1999, "EUR")
    assert created.metadata["order_id"] == order_id

    paid = await provider.confirm_intent(created.reference, idempotency_key=new_key())

    assert paid.status is IntentStatus.SUCCEEDED
    assert paid.reference == created.reference
    intents = await localstripe.intents_for_order(order_id)
    assert [(i["id"], i["status"], i["currency"]) for i in intents] == [
        (created.reference, "succeeded", "eur")
    ]
    assert len(await localstripe.charges_for(created.reference)) == 1
    assert await provider.retrieve_intent(created.reference) == paid


async def test_a_card_declined_at_charge_is_card_declined(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    created = await create_intent(provider, localstripe, order_id=new_key(), card=DECLINED_CARD)

    with pytest.raises(CardDeclined) as declined:
        await provider.confirm_intent(created.reference, idempotency_key=new_key())

    assert declined.value.code == "card_declined"
    after = await provider.retrieve_intent(created.reference)
    assert after.status is IntentStatus.FAILED
    assert after.failure_code == "card_declined"
    assert after.failure_message


async def test_an_unknown_payment_method_is_card_declined(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    order_id = new_key()
    with pytest.raises(CardDeclined) as declined:
        await provider.create_intent(
            amount_minor=500,
            currency="EUR",
            payment_method="pm_doesnotexist0000",
            metadata={"order_id": order_id},
            idempotency_key=new_key(),
        )
    assert declined.value.code == "resource_missing"
    assert await localstripe.intents_for_order(order_id) == []


async def test_cancel_makes_an_intent_unchargeable(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    created = await create_intent(provider, localstripe, order_id=new_key())
    key = new_key()

    cancelled = await provider.cancel_intent(created.reference, idempotency_key=key)
    # Again, as after a lost answer: the provider refuses, the adapter reports the state.
    again = await provider.cancel_intent(created.reference, idempotency_key=key)

    assert cancelled.status is again.status is IntentStatus.FAILED
    assert (await localstripe.intent(created.reference))["status"] == "canceled"


# --- the provider unreachable ----------------------------------------------------------


async def test_an_outage_is_unavailable_after_max_attempts_and_creates_nothing(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    order_id = new_key()
    payment_method = await localstripe.payment_method(SUCCESS_CARD)
    requests_before = await faults.stat("downstream_rq_total")
    aborts_before = await faults.stat("fault.aborts_injected")
    await faults.abort(http_status=503, percent=100)

    with pytest.raises(ProviderUnavailable):
        await provider.create_intent(
            amount_minor=700,
            currency="EUR",
            payment_method=payment_method,
            metadata={"order_id": order_id},
            idempotency_key=new_key(),
        )

    assert await faults.stat("downstream_rq_total") - requests_before == MAX_ATTEMPTS
    assert await faults.stat("fault.aborts_injected") - aborts_before == MAX_ATTEMPTS
    assert await localstripe.intents_for_order(order_id) == []


async def test_half_the_requests_failing_still_charges_each_order_once(
    make_provider: MakeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    # 12 provider calls at 50% aborts: 12 attempts each failed one CI run in the whole suite
    # (12 * 2**-12 per run); 24 make that 12 * 2**-24. Jittered backoff keeps the usual run short.
    provider = make_provider(max_attempts=24)
    aborts_before = await faults.stat("fault.aborts_injected")
    await faults.abort(http_status=503, percent=50)
    orders = [new_key() for _ in range(6)]

    for order_id in orders:
        created = await create_intent(provider, localstripe, order_id=order_id)
        paid = await provider.confirm_intent(created.reference, idempotency_key=new_key())
        assert paid.status is IntentStatus.SUCCEEDED

    for order_id in orders:
        intents = await localstripe.intents_for_order(order_id)
        assert [intent["status"] for intent in intents] == ["succeeded"]
    # 12 calls at 50%: all of them passing first time would be a 1-in-4096 fluke.
    assert await faults.stat("fault.aborts_injected") > aborts_before


# --- answers lost or late --------------------------------------------------------------


async def test_a_confirm_that_times_out_is_unknown_until_retrieved(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    created = await create_intent(provider, localstripe, order_id=new_key())
    await faults.delay(ms=2000)

    with pytest.raises(ProviderOutcomeUnknown):
        await provider.confirm_intent(created.reference, idempotency_key=new_key())

    await faults.clear()
    # Envoy held each attempt back and dropped it when the adapter gave up: nothing charged,
    # and retrieving says so.
    truth = await provider.retrieve_intent(created.reference)
    assert truth.status is IntentStatus.REQUIRES_CONFIRMATION
    assert await localstripe.charges_for(created.reference) == []


async def test_a_confirm_whose_answer_was_lost_is_not_charged_twice(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    created = await create_intent(provider, localstripe, order_id=new_key())
    requests_before = await faults.stat("downstream_rq_total")
    await faults.throttle_responses()

    confirming = asyncio.create_task(
        provider.confirm_intent(created.reference, idempotency_key=new_key())
    )

    async def charged() -> bool:
        return (await localstripe.intent(created.reference))["status"] == "succeeded"

    # localstripe has charged; the answer is still trickling back when the attempt times out.
    await eventually(charged, within=3, interval=0.02, what="localstripe's charge")
    await faults.clear()
    paid = await confirming

    assert paid.status is IntentStatus.SUCCEEDED
    assert len(await localstripe.charges_for(created.reference)) == 1
    # The lost confirm, then one retrieve that found it done: no second confirm.
    assert await faults.stat("downstream_rq_total") - requests_before == 2


async def test_confirming_an_intent_that_already_succeeded_returns_it(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    paid = await paid_intent(provider, localstripe)

    again = await provider.confirm_intent(paid.reference, idempotency_key=new_key())

    assert again.status is IntentStatus.SUCCEEDED
    assert again.reference == paid.reference
    assert len(await localstripe.charges_for(paid.reference)) == 1


# --- refunds ---------------------------------------------------------------------------


async def test_partial_and_full_refunds_are_listed(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    paid = await paid_intent(provider, localstripe, amount_minor=1000)
    first_key, second_key = new_key(), new_key()

    partial = await provider.refund(
        paid.reference,
        amount_minor=300,
        metadata={"reason": "one mug broken"},
        idempotency_key=first_key,
    )
    rest = await provider.refund(
        paid.reference, amount_minor=700, metadata={}, idempotency_key=second_key
    )

    assert (partial.amount_minor, partial.status, partial.intent_reference) == (
        300,
        RefundStatus.SUCCEEDED,
        paid.reference,
    )
    assert partial.metadata == {"reason": "one mug broken", "refund_id": first_key}
    assert rest.metadata == {"refund_id": second_key}
    listed = await provider.list_refunds(paid.reference)
    assert sorted(listed, key=lambda refund: refund.amount_minor) == [partial, rest]

    whole = await paid_intent(provider, localstripe, amount_minor=450)
    full = await provider.refund(
        whole.reference, amount_minor=450, metadata={}, idempotency_key=new_key()
    )
    assert await provider.list_refunds(whole.reference) == [full]
    assert [r["amount"] for r in await localstripe.refunds_for(whole.reference)] == [450]


async def test_a_refund_whose_answer_was_lost_is_not_made_twice(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    paid = await paid_intent(provider, localstripe)
    key = new_key()
    await faults.throttle_responses()

    refunding = asyncio.create_task(
        provider.refund(paid.reference, amount_minor=400, metadata=PADDING, idempotency_key=key)
    )

    async def refunded() -> bool:
        return bool(await localstripe.refunds_for(paid.reference))

    await eventually(refunded, within=3, interval=0.02, what="localstripe's refund")
    await faults.clear()
    refund = await refunding

    at_provider = await localstripe.refunds_for(paid.reference)
    assert [(r["id"], r["amount"]) for r in at_provider] == [(refund.reference, 400)]
    assert refund.metadata["refund_id"] == key


async def test_a_refund_that_cannot_be_checked_is_unknown_and_not_repeated(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    paid = await paid_intent(provider, localstripe)
    await faults.throttle_responses()

    # Every answer is too slow, the lookups before each retry included: the adapter cannot
    # tell whether its refund happened, so it says so instead of sending it again.
    with pytest.raises(ProviderOutcomeUnknown):
        await provider.refund(
            paid.reference, amount_minor=400, metadata=PADDING, idempotency_key=new_key()
        )

    await faults.clear()
    assert [r["amount"] for r in await localstripe.refunds_for(paid.reference)] == [400]


async def test_a_confirm_answered_409_key_in_use_is_checked_never_taken_as_refused(
    provider: StripeProvider, localstripe: LocalStripe, faults: FaultInjector
) -> None:
    # 409 is Stripe's "a request with this idempotency key is still in flight": that
    # request may yet charge, so the adapter must not report the confirm as refused (the
    # payment would be failed while the money is taken).
    created = await create_intent(provider, localstripe, order_id=new_key())
    await faults.abort(409, confirm_only=True)

    with pytest.raises(ProviderOutcomeUnknown):
        await provider.confirm_intent(created.reference, idempotency_key=new_key())

    await faults.clear()
    truth = await provider.retrieve_intent(created.reference)
    assert truth.status is IntentStatus.REQUIRES_CONFIRMATION
    paid = await provider.confirm_intent(created.reference, idempotency_key=new_key())
    assert paid.status is IntentStatus.SUCCEEDED
    assert len(await localstripe.charges_for(created.reference)) == 1


# --- a charge the provider has no record of ----------------------------------------------


async def test_an_intent_the_provider_does_not_know_is_named_so_by_every_call(
    provider: StripeProvider, localstripe: LocalStripe
) -> None:
    lost = f"pi_lost{uuid.uuid4().hex[:20]}"
    calls = {
        "retrieve_intent": provider.retrieve_intent(lost),
        "list_refunds": provider.list_refunds(lost),
        "refund": provider.refund(lost, amount_minor=100, metadata={}, idempotency_key=new_key()),
    }
    for name, call in calls.items():
        with pytest.raises(PaymentUnknownToProvider) as unknown:
            await call
        assert unknown.value.reference == lost, name
