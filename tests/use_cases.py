"""The use cases wired as the server wires them, for tests that call them without gRPC."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from server.adapters.stripe_provider import StripeProvider
from server.db.driver import DriverPool
from server.services.circuit import GuardedProvider
from server.services.use_cases import UseCases, wire_use_cases

NOWHERE = "http://127.0.0.1:9"  # discard port: nothing listens there


def offline_provider() -> GuardedProvider:
    """A payment provider for tests that never reach one (nothing is paid)."""
    return GuardedProvider(
        StripeProvider(api_key="sk_test_x", api_base=NOWHERE, timeout_seconds=1, max_attempts=1),
        threshold=3,
        reset_seconds=1,
    )


def wired(
    engine: AsyncEngine,
    hot_path: DriverPool,
    provider: GuardedProvider | None = None,
    **settings: Any,
) -> UseCases:
    """`settings` override wire_use_cases' keyword arguments (a short payment window, ...)."""
    chosen: dict[str, Any] = {
        "payment_window_seconds": 900.0,
        "lease_seconds": 60.0,
        "recheck_seconds": 1.0,
        "background_batch_size": 7,
    }
    chosen.update(settings)
    return wire_use_cases(engine, hot_path, provider or offline_provider(), **chosen)
