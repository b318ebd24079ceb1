"""The provider's circuit breaker, around a stand-in provider whose answers the test holds
back, so what a caller's cancellation does is decided by the breaker alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.services.circuit import GuardedProvider
from server.services.providers import IntentStatus, ProviderIntent, ProviderUnavailable


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
