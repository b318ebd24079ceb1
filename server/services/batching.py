"""Group commit: concurrent callers share one transaction instead of queueing on row locks
(and, for reads, one query instead of one round trip each).

Callers submit work and await their own outcome. A few runners take everything queued when
they become free and hand it to one handler call, so batches grow exactly as fast as the
database falls behind and no caller waits for a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import structlog

_log = structlog.get_logger("marketplace.batching")

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

BatchHandler = Callable[[Sequence[Item]], Awaitable[Sequence[Outcome | BaseException]]]


class GroupCommitter(Generic[Item, Outcome]):
    def __init__(
        self,
        handler: BatchHandler[Item, Outcome],
        *,
        max_batch: int,
        runners: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._handler = handler
        self._on_batch = on_batch  # told each batch's size, for metrics
        self._max_batch = max_batch
        self._runner_count = runners
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Outcome]]] = asyncio.Queue()
        self._runners: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._runners = [
            asyncio.create_task(self._run(), name=f"group-commit-{n}")
            for n in range(self._runner_count)
        ]

    async def stop(self) -> None:
        for runner in self._runners:
            runner.cancel()
        for runner in self._runners:
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        self._runners = []

    async def submit(self, item: Item) -> Outcome:
        if not self._runners:
            raise RuntimeError("GroupCommitter.start() was not called")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # A caller that gave up (deadline, cancel) is left out; its work is idempotent.
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            if self._on_batch is not None:
                try:
                    self._on_batch(len(batch))
                except Exception:  # a metric must not stop the runner every caller waits on
                    _log.exception("batch size callback failed")
            try:
                outcomes = await self._handler([item for item, _ in batch])
            except Exception as error:  # the batch failed as a whole: every caller learns why
                outcomes = [error] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
