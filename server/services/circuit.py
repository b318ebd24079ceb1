"""A circuit breaker around the payment provider (purgatory), one circuit per provider.

After `threshold` failed calls in a row the circuit opens: calls fail at once with
CircuitOpen, without reaching the provider, until `reset_seconds` have passed; then calls
go through as probes, and the first success closes it again (the first failure reopens it).
Declines and rejected requests are the caller's problem, not the provider's, and never
count. The state is per process: every worker learns of an outage by itself, within
`threshold` calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import structlog
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from server.services.providers import (
    CardDeclined,
    PaymentProvider,
    ProviderIntent,
    ProviderRefund,
    ProviderRejected,
    ProviderUnavailable,
)

Result = TypeVar("Result")
_log = structlog.get_logger("marketplace.payments")


class CircuitOpen(ProviderUnavailable):
    """The provider failed repeatedly; calls are refused without reaching it for a while."""

    def __init__(self, provider: str, retry_after_seconds: float) -> None:
        super().__init__(f"the {provider} circuit is open")
        self.retry_after_seconds = retry_after_seconds


class GuardedProvider:
    """The PaymentProvider port, with every call passing through the provider's circuit."""

    def __init__(
        self,
        provider: PaymentProvider,
        *,
        threshold: int,
        reset_seconds: float,
        on_state_change: Callable[[str, str], None] | None = None,
    ) -> None:
        """`on_state_change(provider, state)` hears "opened", "half-opened", "closed"."""
        self._provider = provider
        self._on_state_change = on_state_change
        self._reset_seconds = reset_seconds
        self._breakers = AsyncCircuitBreakerFactory(
            default_threshold=threshold,
            default_ttl=reset_seconds,
            exclude=[CardDeclined, ProviderRejected],
        )
        self._breakers.add_listener(self._on_event)

    @property
    def name(self) -> str:
        return self._provider.name

    def _on_event(self, circuit: str, event_name: str, event: object) -> None:
        if event_name != "state_changed":
            return
        state = str(getattr(event, "state", event))
        _log.warning("payment provider circuit", provider=circuit, state=state)
        if self._on_state_change is not None:
            self._on_state_change(circuit, state)

    async def raise_if_open(self) -> None:
        """Fails fast while the circuit is open, so a caller can refuse before any work."""
        breaker = await self._breakers.get_breaker(self.name)
        context = breaker.context
        if context.state == "opened" and context.opened_at is not None:
            remaining = context.opened_at + self._reset_seconds - time.time()
            if remaining > 0:
                raise CircuitOpen(self.name, remaining)

    async def _call(self, operation: Callable[[], Awaitable[Result]]) -> Result:
        # A caller that gives up (its deadline, a disconnect) is not a provider failure, and
        # must not cut a charge off halfway either: the call runs to its end in its own task,
        # so the breaker hears the provider's real outcome, and what the call did is
        # recorded by whoever settles the payment (the reconciler, if nobody waits).
        call = asyncio.ensure_future(self._guarded(operation))
        call.add_done_callback(_consume_outcome)
        return await asyncio.shield(call)

    async def _guarded(self, operation: Callable[[], Awaitable[Result]]) -> Result:
        breaker = await self._breakers.get_breaker(self.name)
        try:
            async with breaker:
                return await operation()
        except OpenedState as opened:
            retry_after = max(opened.opened_at + self._reset_seconds - time.time(), 0.0)
            raise CircuitOpen(self.name, retry_after) from None

    async def create_intent(
        self,
        *,
        amount_minor: int,
        currency: str,
        payment_method: str,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> ProviderIntent:
        return await self._call(
            lambda: self._provider.create_intent(
                amount_minor=amount_minor,
                currency=currency,
                payment_method=payment_method,
                metadata=metadata,
                idempotency_key=idempotency_key,
            )
        )

    async def confirm_intent(self, reference: str, *, idempotency_key: str) -> ProviderIntent:
        return await self._call(
            lambda: self._provider.confirm_intent(reference, idempotency_key=idempotency_key)
        )

    async def retrieve_intent(self, reference: str) -> ProviderIntent:
        return await self._call(lambda: self._provider.retrieve_intent(reference))

    async def cancel_intent(self, reference: str, *, idempotency_key: str) -> ProviderIntent:
        return await self._call(
            lambda: self._provider.cancel_intent(reference, idempotency_key=idempotency_key)
        )

    async def refund(
        self,
        intent_reference: str,
        *,
        amount_minor: int,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> ProviderRefund:
        return await self._call(
            lambda: self._provider.refund(
                intent_reference,
                amount_minor=amount_minor,
                metadata=metadata,
                idempotency_key=idempotency_key,
            )
        )

    async def list_refunds(self, intent_reference: str) -> list[ProviderRefund]:
        return await self._call(lambda: self._provider.list_refunds(intent_reference))


def _consume_outcome(call: asyncio.Future[Any]) -> None:
    """Retrieves the outcome of a call whose caller left, so it is not reported unseen."""
    if not call.cancelled():
        call.exception()
