"""The stand-in warehouse of the development stack and the tests: a small process that plays
the external warehouse system the marketplace talks to over NATS.

It reads the marketplace's fulfilment requests (`marketplace.fulfilment.requested`, its own
durable pull consumer on stream MARKETPLACE), waits WAREHOUSE_SHIP_DELAY seconds, ships each
line of a SKU it stocks (on-hand -= quantity, a new level version), and publishes the new
levels on `warehouse.stock_levels` and the shipment on `warehouse.shipments` (stream
WAREHOUSE), as JSON in protobuf's JSON mapping (protos/marketplace/warehouse/v1). It also
reads `warehouse.stock_levels` itself, so a level pushed by hand (`make stock-level`) is the
stock it ships from next. Its state (levels, orders shipped, messages not yet published)
is a JSON file, .data/warehouse.json under make run.

    python -m devstack.warehouse serve --state .data/warehouse.json   # make run starts this
    python -m devstack.warehouse stock-level --sku TEE-BLACK-M --on-hand 40   # make stock-level

Versions are `max(last + 1, now in microseconds)`: the stand-in's and the hand-pushed
levels only grow, without the two sharing any state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import nats
import psycopg
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential,
)
from tenacity.stop import StopBaseT

from devstack import DATA_DIR, REPO_ROOT
from marketplace.events.v1 import events_pb2
from marketplace.warehouse.v1 import warehouse_pb2
from server.domain.inventory import WarehouseMessageRefused, stock_level
from server.events.nats import MARKETPLACE_STREAM, WAREHOUSE_STREAM
from server.events.warehouse import SHIPMENTS_SUBJECT, STOCK_LEVELS_SUBJECT

# How long `make stock-level` keeps trying to have its level stored.
PUBLISH_LEVEL_SECONDS = 15.0

STATE_FILE = DATA_DIR / "warehouse.json"
DEFAULT_SITE = "main"
DEFAULT_SHIP_DELAY_SECONDS = 5.0
FULFILMENT_SUBJECT = "marketplace.fulfilment.requested"
ORDERS_CONSUMER = "standin-warehouse"
LEVELS_CONSUMER = "standin-warehouse-levels"
# Demo products (devstack/postgres.py) the development stack has the warehouse manage, with
# their starting on-hand at site "main".
DEMO_WAREHOUSE_PRODUCTS = {
    "00000000-0000-4000-8000-000000000002": ("TEE-BLACK-M", 50),
    "00000000-0000-4000-8000-000000000004": ("POSTER-A2", 200),
}


def next_version(last: int) -> int:
    return max(last + 1, time.time_ns() // 1000)


@dataclass(frozen=True)
class Outgoing:
    """A message to publish: its subject, JetStream de-duplication id and JSON body."""

    subject: str
    message_id: str
    body: str

    def to_json(self) -> dict[str, str]:
        return {"subject": self.subject, "messageId": self.message_id, "body": self.body}


@dataclass
class WarehouseState:
    """What the warehouse has: on-hand and version per SKU and site, the orders it shipped,
    and the messages it decided to send and has not seen acknowledged (saved before they
    are published, so a crash neither loses them nor ships an order twice)."""

    levels: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    shipped: set[str] = field(default_factory=set)
    outgoing: list[Outgoing] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> WarehouseState:
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls(
            levels={
                sku: {site: (int(v["onHand"]), int(v["version"])) for site, v in sites.items()}
                for sku, sites in raw.get("levels", {}).items()
            },
            shipped=set(raw.get("shipped", [])),
            outgoing=[
                Outgoing(o["subject"], o["messageId"], o["body"]) for o in raw.get("outgoing", [])
            ],
        )

    def save(self, path: Path) -> None:
        raw = {
            "levels": {
                sku: {
                    site: {"onHand": on_hand, "version": version}
                    for site, (on_hand, version) in sorted(sites.items())
                }
                for sku, sites in sorted(self.levels.items())
            },
            "shipped": sorted(self.shipped),
            "outgoing": [message.to_json() for message in self.outgoing],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(raw, indent=2) + "\n")
        scratch.replace(path)  # whole or not at all

    def set_level(self, sku: str, site: str, on_hand: int) -> Outgoing:
        """A new level of `sku` at `site`, with the next version; the message announcing it."""
        _, last = self.levels.get(sku, {}).get(site, (0, 0))
        version = next_version(last)
        self.levels.setdefault(sku, {})[site] = (on_hand, version)
        return level_message(sku, site, on_hand, version)

    def adopt(self, level: warehouse_pb2.StockLevel) -> bool:
        """A level someone published (by hand, or this process's own coming back): kept
        when newer than the one held."""
        _, held = self.levels.get(level.sku, {}).get(level.warehouse, (0, 0))
        if level.version <= held:
            return False
        self.levels.setdefault(level.sku, {})[level.warehouse] = (level.on_hand, level.version)
        return True

    def ship(self, request: events_pb2.FulfilmentRequested) -> list[Outgoing]:
        """Ships what it stocks of an order, once: per site, one shipment and the new
        levels, each line naming the level version that first excludes its units. A SKU it
        does not stock is not its to ship (a product the marketplace manages itself)."""
        if request.order_id in self.shipped:
            return []
        self.shipped.add(request.order_id)
        by_site: dict[str, list[warehouse_pb2.ShipmentLine]] = {}
        levels: list[Outgoing] = []
        for line in request.lines:
            sites = self.levels.get(line.sku, {})
            left = line.quantity
            # From the fullest site first; a line larger than a site leaves from several.
            for site in sorted(sites, key=lambda s: (-sites[s][0], s)):
                take = min(left, sites[site][0])
                if take == 0:
                    continue
                left -= take
                levels.append(self.set_level(line.sku, site, sites[site][0] - take))
                by_site.setdefault(site, []).append(
                    warehouse_pb2.ShipmentLine(
                        sku=line.sku, quantity=take, level_version=self.levels[line.sku][site][1]
                    )
                )
                if left == 0:
                    break
        shipments = [
            shipment_message(f"{site}-{request.order_id}", request.order_id, site, lines)
            for site, lines in sorted(by_site.items())
        ]
        return [*levels, *shipments]


def level_message(sku: str, site: str, on_hand: int, version: int) -> Outgoing:
    body = warehouse_pb2.StockLevel(sku=sku, warehouse=site, on_hand=on_hand, version=version)
    return Outgoing(STOCK_LEVELS_SUBJECT, f"{sku}/{site}/{version}", _json(body))


def shipment_message(
    shipment_id: str, order_id: str, site: str, lines: Iterable[warehouse_pb2.ShipmentLine]
) -> Outgoing:
    body = warehouse_pb2.Shipment(
        shipment_id=shipment_id, order_id=order_id, warehouse=site, lines=list(lines)
    )
    return Outgoing(SHIPMENTS_SUBJECT, shipment_id, _json(body))


def _json(message: warehouse_pb2.StockLevel | warehouse_pb2.Shipment) -> str:
    return json_format.MessageToJson(message, indent=None)


class StandInWarehouse:
    """The process: NATS in and out, the state on disk."""

    def __init__(self, nats_url: str, state_path: Path, ship_delay: float) -> None:
        self._nats_url = nats_url
        self._state_path = state_path
        self._ship_delay = ship_delay
        self._state = WarehouseState.load(state_path)
        self._lock = asyncio.Lock()  # one change of the state (and its file) at a time

    async def run(self) -> None:
        # Every node of a cluster (NATS_URL lists them), so losing one moves to another.
        client = await nats.connect(nats_servers(self._nats_url), max_reconnect_attempts=-1)
        try:
            js = client.jetstream()
            await _wait_for_streams(js)
            async with self._lock:
                # What a crash left unsent, and every level, so a marketplace with a fresh
                # database learns them (a repeated version changes nothing there).
                for sku, sites in self._state.levels.items():
                    for site, (on_hand, version) in sites.items():
                        await _publish_until_acked(js, level_message(sku, site, on_hand, version))
                await self._flush(js)
            await asyncio.gather(self._follow_levels(js), self._follow_orders(js))
        finally:
            await client.close()

    async def _follow_levels(self, js: Any) -> None:
        subscription = await js.pull_subscribe(
            STOCK_LEVELS_SUBJECT,
            durable=LEVELS_CONSUMER,
            stream=WAREHOUSE_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
        )
        while True:
            for message in await _fetch(subscription):
                try:
                    level = json_format.Parse(message.data, warehouse_pb2.StockLevel())
                except json_format.ParseError:
                    await _ack(message)  # not ours to judge; the marketplace dead-letters it
                    continue
                async with self._lock:
                    if self._state.adopt(level):
                        self._state.save(self._state_path)
                        print(f"level {level.sku}@{level.warehouse}: {level.on_hand}", flush=True)
                await _ack(message)

    async def _follow_orders(self, js: Any) -> None:
        subscription = await js.pull_subscribe(
            FULFILMENT_SUBJECT,
            durable=ORDERS_CONSUMER,
            stream=MARKETPLACE_STREAM,
            # Acked once shipped: the delay must not make JetStream deliver it again.
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self._ship_delay + 60),
        )
        shipping: set[asyncio.Task[None]] = set()
        while True:
            for message in await _fetch(subscription):
                task = asyncio.create_task(self._ship_later(js, message))
                shipping.add(task)
                task.add_done_callback(shipping.discard)

    async def _ship_later(self, js: Any, message: Any) -> None:
        try:
            request = events_pb2.FulfilmentRequested.FromString(message.data)
        except DecodeError as error:
            # Unacked, it would come back after every ack wait, forever.
            print(f"not a FulfilmentRequested, dropped: {error}", flush=True)
            await _ack(message)
            return
        await asyncio.sleep(self._ship_delay)
        async with self._lock:
            outgoing = self._state.ship(request)
            self._state.outgoing.extend(outgoing)
            self._state.save(self._state_path)
            await self._flush(js)
        await _ack(message)
        if outgoing:
            print(f"shipped order {request.order_id}", flush=True)

    async def _flush(self, js: Any) -> None:
        """Publishes the saved outgoing messages in order; each leaves the file once
        JetStream has it (its Nats-Msg-Id makes a repeat after a crash harmless)."""
        while self._state.outgoing:
            await _publish_until_acked(js, self._state.outgoing[0])
            self._state.outgoing.pop(0)
            self._state.save(self._state_path)


async def _wait_for_streams(js: Any) -> None:
    """The marketplace server creates the streams when it connects; until then, wait."""
    while True:
        try:
            await js.stream_info(MARKETPLACE_STREAM)
            await js.stream_info(WAREHOUSE_STREAM)
            return
        except (NotFoundError, TimeoutError, nats.errors.Error):
            await asyncio.sleep(0.5)


async def _fetch(subscription: Any) -> list[Any]:
    """The next messages, or none after a second without any. While NATS is away (the
    client reconnects by itself) it waits a moment rather than spin."""
    try:
        messages: list[Any] = await subscription.fetch(10, timeout=1)
    except TimeoutError:  # asyncio's, which nats-py's own TimeoutError extends
        return []
    except nats.errors.Error:
        await asyncio.sleep(1)
        return []
    return messages


async def _ack(message: Any) -> None:
    # An ack lost with the connection only means a redelivery, which changes nothing.
    with contextlib.suppress(TimeoutError, nats.errors.Error):
        await message.ack()


async def _publish_until_acked(js: Any, message: Outgoing) -> None:
    """Publishes until JetStream acknowledges: NATS down only delays what the warehouse
    says (its state file keeps the message meanwhile)."""
    await _publish_retrying(js, message, stop=stop_never)


async def _publish_retrying(js: Any, message: Outgoing, *, stop: StopBaseT) -> None:
    """Publishes `message` (its Nats-Msg-Id makes a repeat harmless) until JetStream
    acknowledges or `stop` says to give up, which raises the last error."""
    async for attempt in AsyncRetrying(
        stop=stop,
        wait=wait_exponential(multiplier=0.2, max=5.0),
        retry=retry_if_exception_type((TimeoutError, nats.errors.Error)),
        before_sleep=lambda state: print(
            f"cannot publish yet ({state.outcome.exception()!r}); retrying"
            if state.outcome
            else "cannot publish yet; retrying",
            flush=True,
        ),
        reraise=True,
    ):
        with attempt:
            await _publish(js, message)


async def _publish(js: Any, message: Outgoing) -> None:
    await js.publish(
        message.subject,
        message.body.encode(),
        headers={"Nats-Msg-Id": message.message_id, "Content-Type": "application/json"},
    )


def seed_demo_warehouse(database_url: str, state_path: Path = STATE_FILE) -> None:
    """On a first run (no state file yet): the demo products in DEMO_WAREHOUSE_PRODUCTS
    become warehouse-managed, and the warehouse holds their starting level, which it
    publishes when it starts."""
    if state_path.exists():
        return
    state = WarehouseState()
    with psycopg.connect(database_url) as conn:
        for product_id, (sku, on_hand) in DEMO_WAREHOUSE_PRODUCTS.items():
            conn.execute(
                "UPDATE products SET inventory_source = 'WAREHOUSE' WHERE id = %s AND sku = %s",
                (product_id, sku),
            )
            state.set_level(sku, DEFAULT_SITE, on_hand)
    state.save(state_path)


def start_warehouse(
    nats_url: str,
    state_path: Path = STATE_FILE,
    *,
    ship_delay: float | None = None,
    log: IO[Any] | int | None = None,
) -> subprocess.Popen[bytes]:
    """The stand-in as its own process (make run, the tests' stack)."""
    delay = ship_delay if ship_delay is not None else ship_delay_from_environment()
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devstack.warehouse",
            "serve",
            "--nats-url",
            nats_url,
            "--state",
            str(state_path),
            "--ship-delay",
            str(delay),
        ],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def ship_delay_from_environment() -> float:
    return float(os.environ.get("WAREHOUSE_SHIP_DELAY", DEFAULT_SHIP_DELAY_SECONDS))


async def publish_stock_level(nats_url: str, sku: str, on_hand: int, site: str) -> Outgoing:
    """`make stock-level`: a level as the warehouse would send it, version = now in µs.
    Tried for up to PUBLISH_LEVEL_SECONDS: when a cluster has just lost the node that led
    the stream, JetStream answers nothing (no responders) until it elects another (seen in
    CI right after a node was killed)."""
    message = level_message(sku, site, on_hand, next_version(0))
    client = await nats.connect(nats_servers(nats_url), connect_timeout=2, max_reconnect_attempts=0)
    try:
        await _publish_retrying(
            client.jetstream(), message, stop=stop_after_delay(PUBLISH_LEVEL_SECONDS)
        )
    finally:
        await client.close()
    return message


def nats_servers(nats_url: str) -> list[str]:
    """NATS_URL's comma-separated nodes, as the server reads them (server/events/nats.py)."""
    return [server.strip() for server in nats_url.split(",") if server.strip()]


def _default_nats_url() -> str:
    return os.environ.get("NATS_URL") or f"nats://127.0.0.1:{os.environ.get('NATS_PORT', '4222')}"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.warehouse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the stand-in warehouse (make run does)")
    serve.add_argument("--state", type=Path, default=STATE_FILE)
    serve.add_argument("--ship-delay", type=float, default=ship_delay_from_environment())
    level = commands.add_parser("stock-level", help="publish a stock level (make stock-level)")
    level.add_argument("--sku", required=True)
    level.add_argument("--on-hand", type=int, required=True)
    level.add_argument("--warehouse", default=DEFAULT_SITE)
    for command in (serve, level):
        command.add_argument("--nats-url", default=_default_nats_url())
    options = parser.parse_args()
    if options.command == "stock-level":
        return _push_stock_level(options.nats_url, options.sku, options.on_hand, options.warehouse)
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(StandInWarehouse(options.nats_url, options.state, options.ship_delay).run())
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _push_stock_level(nats_url: str, sku: str, on_hand: int, site: str) -> int:
    try:
        # Only its shape is checked here: a level the marketplace refuses (an unknown SKU, a
        # product it manages itself) goes to its dead letters, which is worth seeing too.
        stock_level(sku=sku, warehouse=site, on_hand=on_hand, version=next_version(0))
    except WarehouseMessageRefused as refused:
        print(f"not a stock level: {refused.reason}", file=sys.stderr)
        return 2
    try:
        sent = asyncio.run(publish_stock_level(nats_url, sku, on_hand, site))
    except (OSError, nats.errors.Error) as error:
        print(
            f"could not publish to NATS at {nats_url} ({error!r}); is `make run` up?",
            file=sys.stderr,
        )
        return 1
    print(f"published on {sent.subject}: {sent.body}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
