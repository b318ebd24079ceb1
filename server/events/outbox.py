"""The transactional outbox's writer: a use case appends its events on the connection of the
transaction that makes the change, so an event row exists exactly when the change committed.
The relay (server/events/relay.py) publishes the rows.

Per-aggregate sequence numbers come from the aggregate's own row: orders, payments and
products have an `event_sequence` column that every change with an event bumps in the
UPDATE that makes it (`event_sequence = event_sequence + 1 ... RETURNING event_sequence`),
under the row lock the change holds anyway. So numbering costs no extra statement or lock,
and sequence n + 1 is inserted (and committed) after sequence n: the relay, publishing in
`position` order, publishes them in commit order.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from server.tracing import current_traceparent


@dataclass(frozen=True)
class OutboxEvent:
    event_id: uuid.UUID
    aggregate_type: str  # "order" | "payment" | "inventory" | "fulfilment"
    aggregate_id: str
    sequence: int
    subject: str  # "marketplace.order.created"
    type_name: str  # "marketplace.events.v1.OrderCreated"
    payload: bytes  # the serialized event message
    # The W3C trace context the relay continues (server/tracing.py); None takes the current
    # span's when the event is written.
    traceparent: str | None = None


# One statement for any number of events: arrays bound as parameters, unnested server-side.
# Also a CTE of the order transaction's write (server/services/orders/placement.py).
INSERT_EVENTS = """
    INSERT INTO outbox (event_id, aggregate_type, aggregate_id, sequence, subject, type_name,
                        payload, traceparent)
    SELECT * FROM unnest(CAST(:event_ids AS uuid[]), CAST(:event_aggregate_types AS text[]),
                         CAST(:event_aggregate_ids AS text[]),
                         CAST(:event_sequences AS bigint[]), CAST(:event_subjects AS text[]),
                         CAST(:event_type_names AS text[]), CAST(:event_payloads AS bytea[]),
                         CAST(:event_traceparents AS text[]))
"""
_INSERT_EVENTS = text(INSERT_EVENTS)


def insert_parameters(events: Sequence[OutboxEvent]) -> dict[str, Any]:
    """INSERT_EVENTS' parameters for these events."""
    current = current_traceparent()
    return {
        "event_ids": [event.event_id for event in events],
        "event_aggregate_types": [event.aggregate_type for event in events],
        "event_aggregate_ids": [event.aggregate_id for event in events],
        "event_sequences": [event.sequence for event in events],
        "event_subjects": [event.subject for event in events],
        "event_type_names": [event.type_name for event in events],
        "event_payloads": [event.payload for event in events],
        "event_traceparents": [event.traceparent or current for event in events],
    }


async def append_events(conn: AsyncConnection, events: Sequence[OutboxEvent]) -> None:
    """Writes the events in the caller's transaction, in one statement; nothing for none."""
    if events:
        await conn.execute(_INSERT_EVENTS, insert_parameters(events))


class Outbox:
    """The use cases' way to the outbox. `enabled=False` is the benchmark's OUTBOX_WRITES=false:
    no rows are written (sequence numbers still move), to measure the order transaction
    without them in the same run. Never for production: events would be lost."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled

    async def append(self, conn: AsyncConnection, events: Sequence[OutboxEvent]) -> None:
        if self.enabled:
            await append_events(conn, events)
