"""`make events`: tails a JetStream stream in readable form, decoding each message with the
descriptor set in generated/ by its Marketplace-Event-Type header (protobuf JSON); a message
without one (JSON from the warehouse) is shown as its text.

    python -m server.tools.events_tail                  # new events on MARKETPLACE
    python -m server.tools.events_tail --from start     # every stored one, then new ones
    python -m server.tools.events_tail --stream MARKETPLACE_DLQ   # the dead letters

NATS_URL names the server (default: make run's, nats://127.0.0.1:$NATS_PORT). Reads with an
ordered consumer of its own, which JetStream forgets when it stops: the durable consumers'
positions are never touched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import nats
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from server.events.consumers import EVENT_TYPE_HEADER
from server.events.nats import DEAD_LETTER_STREAM, MARKETPLACE_STREAM, WAREHOUSE_STREAM

DESCRIPTOR_SET = Path(__file__).resolve().parents[2] / "generated" / "marketplace.binpb"
_CONNECT_SECONDS = 5.0
_HIDDEN_HEADERS = frozenset({"Nats-Msg-Id", "Content-Type", EVENT_TYPE_HEADER})


class EventDecoder:
    """Message types by full name, from a descriptor set: any event a newer server sends is
    readable as soon as `make proto` has run, without new code here."""

    def __init__(self, descriptor_set: bytes) -> None:
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
        self._pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            self._pool.Add(file)

    def to_json(self, type_name: str, data: bytes) -> str:
        """The message as protobuf JSON; raises KeyError for a type the set lacks and
        DecodeError for data that is not one."""
        descriptor = self._pool.FindMessageTypeByName(type_name)
        message = message_factory.GetMessageClass(descriptor).FromString(data)
        return json_format.MessageToJson(message, indent=2)


def render(
    decoder: EventDecoder,
    *,
    sequence: int,
    time: datetime,
    subject: str,
    headers: Mapping[str, str],
    data: bytes,
) -> str:
    """One message as a header line, its other headers, and its body."""
    type_name = headers.get(EVENT_TYPE_HEADER, "")
    lines = [f"#{sequence}  {time.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}"[:-3] + f"  {subject}"]
    if type_name:
        lines[0] += f"  ({type_name})"
    lines += [
        f"  {name}: {value}" for name, value in headers.items() if name not in _HIDDEN_HEADERS
    ]
    lines.append(_body(decoder, type_name, data))
    return "\n".join(lines)


def _body(decoder: EventDecoder, type_name: str, data: bytes) -> str:
    if type_name:
        try:
            return decoder.to_json(type_name, data)
        except KeyError:
            return f"(type {type_name} is not in {DESCRIPTOR_SET.name}: run make proto) {data!r}"
        except DecodeError as error:
            return f"(not a {type_name}: {error}) {data!r}"
    try:
        return json.dumps(json.loads(data), indent=2)
    except ValueError:
        return data.decode(errors="replace")


async def tail(url: str, stream: str, from_start: bool, out: TextIO) -> None:
    decoder = EventDecoder(DESCRIPTOR_SET.read_bytes())

    async def quiet(error: Exception) -> None:
        """nats-py prints each failed attempt; the timeout below says it once."""

    async with asyncio.timeout(_CONNECT_SECONDS):
        client = await nats.connect(url, max_reconnect_attempts=-1, error_cb=quiet)
    try:
        jetstream = client.jetstream()
        info = await jetstream.stream_info(stream)
        policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
        subscription = await jetstream.subscribe(
            ">",
            stream=stream,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=policy),
        )
        # Only once the consumer exists: "new" counts from its creation, so an event sent
        # after this line is shown (one sent between an earlier line and it was not).
        print(
            f"{stream} on {url}: {info.state.messages} stored;"
            f" {'all of them, then new ones' if from_start else 'new ones only'} (Ctrl-C stops)",
            file=out,
            flush=True,
        )
        async for message in subscription.messages:
            print(_rendered(decoder, message), "", sep="\n", file=out, flush=True)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def _rendered(decoder: EventDecoder, message: Msg) -> str:
    metadata = message.metadata
    return render(
        decoder,
        sequence=metadata.sequence.stream,
        time=metadata.timestamp,
        subject=message.subject,
        headers=dict(message.headers or {}),
        data=message.data,
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="make events", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="start", choices=("new", "start"), default="new")
    parser.add_argument(
        "--stream",
        default=MARKETPLACE_STREAM,
        choices=(MARKETPLACE_STREAM, DEAD_LETTER_STREAM, WAREHOUSE_STREAM),
    )
    options = parser.parse_args()
    default_url = f"nats://127.0.0.1:{os.environ.get('NATS_PORT', '4222')}"
    url = os.environ.get("NATS_URL") or default_url
    try:
        asyncio.run(tail(url, options.stream, options.start == "start", sys.stdout))
    except KeyboardInterrupt:
        return 0
    except TimeoutError:
        print(f"no NATS answered at {url}; is make run up?", file=sys.stderr)
        return 1
    except (OSError, nats.errors.Error) as error:
        print(f"cannot tail {options.stream} on {url}: {error!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
