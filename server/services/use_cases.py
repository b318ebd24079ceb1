"""Every use case, wired to its collaborators as the server runs them (server/app.py builds
this once; the integration tests build it the same way)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from server.db.driver import DriverPool
from server.domain.payments import PaymentStatus
from server.events.outbox import Outbox
from server.services.catalog import Catalog
from server.services.circuit import GuardedProvider
from server.services.orders.cancellation import OrderCancellation
from server.services.orders.placement import OrderPlacement
from server.services.orders.reads import OrderReads
from server.services.payments.charging import Charging
from server.services.payments.reads import PaymentReads
from server.services.payments.refunds import Refunds
from server.services.payments.settlement import Settlement
from server.services.payments.webhooks import ProviderEvents
from server.services.product_cache import ProductsChanged, no_cache
from server.services.upkeep import Upkeep
from server.services.warehouse import WarehouseFeed


@dataclass(frozen=True)
class UseCases:
    catalog: Catalog
    placement: OrderPlacement
    order_reads: OrderReads
    cancellation: OrderCancellation
    charging: Charging
    settlement: Settlement
    refunds: Refunds
    payment_reads: PaymentReads
    provider_events: ProviderEvents
    upkeep: Upkeep
    warehouse: WarehouseFeed


def wire_use_cases(
    engine: AsyncEngine,
    hot_path: DriverPool,
    provider: GuardedProvider,
    *,
    payment_window_seconds: float,
    lease_seconds: float,
    recheck_seconds: float,
    background_batch_size: int,
    products_changed: ProductsChanged = no_cache,
    on_orders_placed: Callable[[int], None] = lambda count: None,
    on_payment_answered: Callable[[PaymentStatus], None] = lambda status: None,
    outbox_writes: bool = True,
) -> UseCases:
    """`lease_seconds`: how long work in flight at the provider keeps the reconciler away
    from its row (it must outlast a provider call with all its retries); `recheck_seconds`:
    when to ask again about a charge or refund the provider has not finished;
    `outbox_writes`: the benchmark's switch (OUTBOX_WRITES), off writes no events."""
    outbox = Outbox(enabled=outbox_writes)
    settlement = Settlement(engine, recheck_seconds=recheck_seconds, outbox=outbox)
    refunds = Refunds(
        engine,
        provider,
        lease_seconds=lease_seconds,
        recheck_seconds=recheck_seconds,
        products_changed=products_changed,
        outbox=outbox,
    )
    return UseCases(
        catalog=Catalog(engine, hot_path, products_changed=products_changed, outbox=outbox),
        placement=OrderPlacement(
            engine,
            hot_path,
            payment_window_seconds=payment_window_seconds,
            products_changed=products_changed,
            on_placed=on_orders_placed,
            outbox=outbox,
        ),
        order_reads=OrderReads(engine),
        cancellation=OrderCancellation(
            engine,
            provider,
            refunds,
            lease_seconds=lease_seconds,
            products_changed=products_changed,
            outbox=outbox,
        ),
        charging=Charging(
            engine,
            provider,
            settlement,
            lease_seconds=lease_seconds,
            on_answered=on_payment_answered,
        ),
        settlement=settlement,
        refunds=refunds,
        payment_reads=PaymentReads(engine),
        provider_events=ProviderEvents(engine, settlement, provider),
        upkeep=Upkeep(
            engine,
            settlement,
            refunds,
            provider,
            batch_size=background_batch_size,
            lease_seconds=lease_seconds,
            outbox=outbox,
        ),
        warehouse=WarehouseFeed(outbox),
    )
