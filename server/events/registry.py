"""The one place consumers are registered: every server process runs every consumer listed
by `consumer_specs` (JetStream spreads a durable's messages over the processes).

To add one, write a factory next to your code that takes what it needs from the context and
returns a `ConsumerSpec`, and append it below:

    # server/notifications/consumer.py
    def notification_consumer(context: ConsumerContext) -> ConsumerSpec:
        async def handle(delivery: Delivery) -> None:
            async with context.inbox.once("notifications", delivery.message_id) as conn:
                if conn is None:
                    return
                ...  # raise Unprocessable(reason) for a message that can never be applied
        return ConsumerSpec(
            name="notifications",
            stream=MARKETPLACE_STREAM,
            filter_subjects=("marketplace.order.>", "marketplace.payment.>"),
            handle=handle,
        )

Types: `ConsumerSpec`, `Delivery`, `Unprocessable` and `Inbox` live in
server/events/consumers.py; the stream names in server/events/nats.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from server.events.consumers import ConsumerSpec, Inbox
from server.events.warehouse import shipments_consumer, stock_levels_consumer
from server.notifications.consumer import notification_consumer
from server.observability import Metrics
from server.services.product_cache import ProductsChanged, no_cache
from server.services.use_cases import UseCases
from server.settings import Settings


@dataclass(frozen=True)
class ConsumerContext:
    """What a consumer factory may build its handler from (server/app.py makes one per
    process; tests make their own)."""

    settings: Settings
    engine: AsyncEngine
    inbox: Inbox
    use_cases: UseCases
    metrics: Metrics
    # Tell the process's product cache about products whose stock a handler changed.
    products_changed: ProductsChanged = no_cache


def consumer_specs(context: ConsumerContext) -> list[ConsumerSpec]:
    """Every consumer the server runs."""
    specs: list[ConsumerSpec] = []
    # Order emails; none without SMTP_URL (docs/architecture.md, Notifications).
    if (notifications := notification_consumer(context)) is not None:
        specs.append(notifications)
    # The warehouse's stock levels and shipments (docs/architecture.md, The warehouse).
    specs += [stock_levels_consumer(context), shipments_consumer(context)]
    return specs
