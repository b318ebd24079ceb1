"""`python -m tests.integration.relay_crash DATABASE_URL NATS_URL`: a relay that SIGKILLs its
own process right after JetStream acknowledged its first batch, before marking the rows:
the crash the Nats-Msg-Id dedupe is for."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import psycopg

from server.events.nats import NatsConnection
from server.events.relay import Relay
from tests.integration.events import relay_for


class CrashingRelay(Relay):
    async def _mark_published(
        self, conn: psycopg.AsyncConnection[Any], positions: Sequence[int]
    ) -> None:
        if positions:
            os.kill(os.getpid(), signal.SIGKILL)


async def main(database_url: str, nats_url: str) -> None:
    nats_connection = NatsConnection(nats_url)
    relay = relay_for(database_url, nats_connection)
    relay.__class__ = CrashingRelay
    await asyncio.gather(nats_connection.run(), relay.run())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
