"""The wait between tries of a loop that runs until cancelled (the relay, the consumers, the
NATS connection): doubling after each failure up to a maximum, back to the first after
progress, with ±20% jitter so that processes retrying one broken dependency spread out
instead of knocking in step.

Not tenacity, which the order transaction and the product cache use: tenacity retries one
call until it succeeds, while these loops never end, and each decides what counts as
progress (`reset`)."""

from __future__ import annotations

import asyncio
import random


def jittered(seconds: float) -> float:
    """`seconds` give or take a fifth, at random: every wait between retries here is."""
    return seconds * random.uniform(0.8, 1.2)


class Backoff:
    def __init__(self, first_seconds: float, max_seconds: float) -> None:
        self._first = first_seconds
        self._max = max_seconds
        self._next = first_seconds

    def reset(self) -> None:
        """After progress: the next wait is the first one again."""
        self._next = self._first

    async def wait(self) -> None:
        """Sleeps this try's wait (jittered); the next one is twice as long, up to the max."""
        await asyncio.sleep(jittered(self._next))
        self._next = min(self._next * 2, self._max)
