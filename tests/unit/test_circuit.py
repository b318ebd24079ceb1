"""The provider's circuit breaker, around stand-in providers: one whose answers the test
holds back, so what a caller's cancellation does is decided by the breaker alone, one that
records what reaches it, and one that refuses."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.services.circuit import GuardedProvider
from server.services.providers import (
    CardDeclined,
    IntentStatus,
    ProviderIntent,
    ProviderRejected,
    ProviderUnavailable,
)


class HeldBackProvider:
    """Answers retrieve_intent when the test releases it, or fails as told."""

    name = "stand-in"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.finished = 0
        self.fail = False

    async def retrieve_intent(self, reference: str) -> ProviderIntent:
        await self.release.wait()
        self.finished += 1
        if self.fail:
            raise ProviderUnavailable("down")
        return ProviderIntent(reference, IntentStatus.SUCCEEDED, 100, "USD")


def _guarded(provider: Any) -> GuardedProvider:
    return GuardedProvider(provider, threshold=2, reset_seconds=60)


async def test_callers_giving_up_neither_open_the_circuit_nor_cut_the_call_short() -> None:
    provider = HeldBackProvider()
    guarded = _guarded(provider)
    callers = [asyncio.ensure_future(guarded.retrieve_intent(f"pi_{n}")) for n in range(3)]
    await asyncio.sleep(0)
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)

    provider.release.set()
    answer = await guarded.retrieve_intent("pi_after")

    assert answer.status is IntentStatus.SUCCEEDED
    assert provider.finished == 4  # the abandoned calls ran to their end
    await guarded.raise_if_open()  # still closed


async def test_provider_failures_still_open_it() -> None:
    provider = HeldBackProvider()
    provider.fail = True
    provider.release.set()
    guarded = _guarded(provider)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            await guarded.retrieve_intent("pi_x")
    with pytest.raises(ProviderUnavailable, match="circuit is open"):
        await guarded.raise_if_open()


class RecordingProvider:
    """Every port method, answering at once and recording what it was called with."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...], dict[str, object]]] = []

    def __getattr__(self, method: str) -> Any:
        async def record(*args: object, **kwargs: object) -> str:
            self.calls.append((method, args, kwargs))
            return f"{method} answered"

        return record


async def test_every_port_method_reaches_the_provider_with_its_arguments() -> None:
    provider = RecordingProvider()
    guarded: Any = _guarded(provider)
    calls: list[tuple[str, tuple[object, ...], dict[str, object]]] = [
        (
            "create_intent",
            (),
            {
                "amount_minor": 100,
                "currency": "EUR",
                "payment_method": "pm_card",
                "metadata": {"order_id": "o1"},
                "idempotency_key": "k1",
            },
        ),
        ("confirm_intent", ("pi_1",), {"idempotency_key": "k2"}),
        ("retrieve_intent", ("pi_1",), {}),
        ("cancel_intent", ("pi_1",), {"idempotency_key": "k3"}),
        ("refund", ("pi_1",), {"amount_minor": 50, "metadata": {}, "idempotency_key": "k4"}),
        ("list_refunds", ("pi_1",), {}),
    ]
    for method, args, kwargs in calls:
        assert await getattr(guarded, method)(*args, **kwargs) == f"{method} answered"
    assert provider.calls == calls


class RefusingProvider:
    """Refuses every retrieve_intent as told: the caller's problem, not the provider's."""

    name = "stand-in"

    def __init__(self, refusal: Exception) -> None:
        self.refusal = refusal

    async def retrieve_intent(self, reference: str) -> ProviderIntent:
        raise self.refusal


@pytest.mark.parametrize(
    "refusal",
    [CardDeclined("card_declined", "no"), ProviderRejected("invalid", "no", 400)],
    ids=["declined", "rejected"],
)
async def test_declines_and_rejections_never_open_it(refusal: Exception) -> None:
    guarded = _guarded(RefusingProvider(refusal))
    for _ in range(3):
        with pytest.raises(type(refusal)):
            await guarded.retrieve_intent("pi_x")
    await guarded.raise_if_open()  # still closed
