"""`make events` (server/tools/events_tail.py) against a real nats-server: events decoded
from the descriptor set by their type header, the warehouse's JSON as JSON, from the start
or only new ones."""

from __future__ import annotations

import asyncio
import sys
import uuid

import pytest

from marketplace.events.v1 import events_pb2
from server.events.nats import ensure_streams
from tests.integration.events import nats_client
from tests.stack import NatsServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def publish_order_created(url: str, order_id: str) -> None:
    event_id = str(uuid.uuid4())
    event = events_pb2.OrderCreated(
        metadata=events_pb2.EventMetadata(
            event_id=event_id, event_type="order.created", aggregate_id=order_id, sequence=1
        ),
        order_id=order_id,
        customer_id="alice",
    )
    async with nats_client(url) as client:
        jetstream = client.jetstream()
        await ensure_streams(jetstream)
        await jetstream.publish(
            "marketplace.order.created",
            event.SerializeToString(),
            headers={
                "Nats-Msg-Id": event_id,
                # a header the tail does not show in its heading line
                "Nats-Expected-Stream": "MARKETPLACE",
                "Marketplace-Event-Type": "marketplace.events.v1.OrderCreated",
            },
        )


async def tail_until(url: str, *args: str, expect: str, then: str | None = None) -> str:
    """Runs the tail until its output contains `expect` (publishing order `then` once it
    has started); its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.tools.events_tail",
        *args,
        env={"NATS_URL": url, "PATH": ""},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    output = ""
    try:
        async with asyncio.timeout(30):
            while expect not in output:
                line = await process.stdout.readline()
                if not line:
                    break
                output += line.decode()
                if then is not None and "(Ctrl-C stops)" in line.decode():
                    await publish_order_created(url, then)
    finally:
        process.kill()
        await process.wait()
    assert expect in output, output
    return output


async def test_events_are_decoded_by_their_type_from_the_start(nats_server: NatsServer) -> None:
    order_id = str(uuid.uuid4())
    await publish_order_created(nats_server.url, order_id)
    output = await tail_until(nats_server.url, "--from", "start", expect=f'"orderId": "{order_id}"')
    assert "marketplace.order.created  (marketplace.events.v1.OrderCreated)" in output
    assert '"eventType": "order.created"' in output
    assert "  Nats-Expected-Stream: MARKETPLACE" in output
    assert "Nats-Msg-Id: " not in output  # it is the event id, shown in the body's metadata


async def test_only_new_events_by_default(nats_server: NatsServer) -> None:
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    await publish_order_created(nats_server.url, old)
    output = await tail_until(nats_server.url, expect=f'"orderId": "{new}"', then=new)
    assert old not in output


async def test_warehouse_json_is_shown_as_json(nats_server: NatsServer) -> None:
    async with nats_client(nats_server.url) as client:
        jetstream = client.jetstream()
        await ensure_streams(jetstream)
        await jetstream.publish(
            "warehouse.stock_levels", b'{"sku":"MUG","warehouse":"main","onHand":4,"version":7}'
        )
    output = await tail_until(
        nats_server.url, "--from", "start", "--stream", "WAREHOUSE", expect='"version": 7'
    )
    assert '"onHand": 4' in output
