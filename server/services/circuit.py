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
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import structlog
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from server.services.providers import (
    CardDeclined,
    PaymentProvider,
    ProviderRejected,
    ProviderUnavailable,
)

Params = ParamSpec("Params")
Result = TypeVar("Result")
_log = structlog.get_logger("marketplace.payments")


class CircuitOpen(ProviderUnavailable):
    """The provider failed repeatedly; calls are refused without reaching it for a while."""

    def __init__(self, provider: str, retry_after_seconds: float) -> None:
        super().__init__(f"the {provider} circuit is open")
        self.retry_after_seconds = retry_after_seconds


class _ThroughCircuit(Generic[Params, Result]):
    """A PaymentProvider method of GuardedProvider: the wrapped provider's method of the
    same name, called through the circuit.

    A descriptor built from the Protocol's own method, so mypy takes each signature from
    the port and checks every call against it; forwarding methods written out would copy
    the port's signatures a third time, and a `__getattr__` proxy would hand callers Any.
    """

    def __init__(
        self, method: Callable[Concatenate[PaymentProvider, Params], Coroutine[Any, Any, Result]]
    ) -> None:
        self._name = method.__name__

    def __set_name__(self, owner: type[object], name: str) -> None:
        if name != self._name:
            raise TypeError(f"{owner.__name__}.{name} would call the provider's {self._name}")

    @overload
    def __get__(self, guarded: None, owner: type[object]) -> _ThroughCircuit[Params, Result]: ...

    @overload
    def __get__(
        self, guarded: GuardedProvider, owner: type[object] | None = None
    ) -> Callable[Params, Coroutine[Any, Any, Result]]: ...

    def __get__(
        self, guarded: GuardedProvider | None, owner: type[object] | None = None
    ) -> _ThroughCircuit[Params, Result] | Callable[Params, Coroutine[Any, Any, Result]]:
        if guarded is None:
            return self
        method: Callable[Params, Awaitable[Result]] = getattr(guarded._provider, self._name)

        async def through_circuit(*args: Params.args, **kwargs: Params.kwargs) -> Result:
            return await guarded._call(lambda: method(*args, **kwargs))

        return through_circuit


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

    # The port's methods, typed by PaymentProvider itself (see _ThroughCircuit).
    create_intent = _ThroughCircuit(PaymentProvider.create_intent)
    confirm_intent = _ThroughCircuit(PaymentProvider.confirm_intent)
    retrieve_intent = _ThroughCircuit(PaymentProvider.retrieve_intent)
    cancel_intent = _ThroughCircuit(PaymentProvider.cancel_intent)
    refund = _ThroughCircuit(PaymentProvider.refund)
    list_refunds = _ThroughCircuit(PaymentProvider.list_refunds)


def _consume_outcome(call: asyncio.Future[Any]) -> None:
    """Retrieves the outcome of a call whose caller left, so it is not reported unseen."""
    if not call.cancelled():
        call.exception()
