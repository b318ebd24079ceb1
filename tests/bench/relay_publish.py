"""The relay's CPU per event for publishing and collecting acknowledgements, with the
headers it sends now and with the five it sent before (Marketplace-Event-Id, Content-Type
and Nats-Expected-Stream too), taking turns in one run against a real nats-server.

    .venv/bin/python -m tests.bench.relay_publish [EVENTS_PER_ROUND] [ROUNDS]

CPU time of this process, not wall time: the relay shares its worker with the order path,
so what it costs is the CPU it takes from that path."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Callable

import nats
from nats.aio.client import Client
from opentelemetry.trace import Span

from server.events.nats import MARKETPLACE_STREAM, ensure_streams
from server.events.relay import AckedPublisher, OutboxRow
from tests.stack import running_nats


class FiveHeaderRow(OutboxRow):
    def headers(self, span: Span | None = None) -> dict[str, str]:
        return super().headers(span) | {
            "Marketplace-Event-Id": self.event_id,
            "Content-Type": "application/x-protobuf",
            "Nats-Expected-Stream": MARKETPLACE_STREAM,
        }


def rows(kind: Callable[..., OutboxRow], count: int) -> list[OutboxRow]:
    payload = bytes(300)  # about an OrderCreated of two lines
    return [
        kind(
            position=n,
            event_id=str(uuid.uuid4()),
            aggregate=("order", str(n)),
            subject="marketplace.order.created",
            type_name="marketplace.events.v1.OrderCreated",
            payload=payload,
        )
        for n in range(count)
    ]


async def cpu_per_event(client: Client, batch: list[OutboxRow]) -> float:
    publisher = AckedPublisher()
    # The reply subscription first.
    await publisher.acknowledgements(await publisher.send(client, rows(OutboxRow, 1)), 5.0)
    started = time.process_time()
    acks = await publisher.acknowledgements(await publisher.send(client, batch), 30.0)
    assert all(isinstance(ack, int) for ack in acks)
    return (time.process_time() - started) / len(batch) * 1e6


async def main(events: int, rounds: int) -> None:
    with running_nats() as server:
        for skip in (False, True):
            client = await nats.connect(server.url, skip_subject_validation=skip)
            await ensure_streams(client.jetstream())
            figures: dict[str, list[float]] = {"5 headers": [], "2 headers": []}
            for _ in range(rounds):
                figures["5 headers"].append(
                    await cpu_per_event(client, rows(FiveHeaderRow, events))
                )
                figures["2 headers"].append(await cpu_per_event(client, rows(OutboxRow, events)))
            await client.close()
            for name, values in figures.items():
                print(
                    f"skip_subject_validation={skip!s:5}  {name}: median"
                    f" {statistics.median(values):5.1f} us CPU per event over {rounds} rounds"
                    f" of {events}"
                )
            # Rounds next to each other share the machine's state: their differences vary
            # less than either figure.
            saved = [five - two for five, two in zip(*figures.values(), strict=True)]
            median_saved = statistics.median(saved)
            print(f"  5 - 2 headers, median of the rounds' differences: {median_saved:+.1f} us")


if __name__ == "__main__":
    arguments = [int(value) for value in sys.argv[1:]]
    asyncio.run(main(*(arguments or [5000, 7])))
