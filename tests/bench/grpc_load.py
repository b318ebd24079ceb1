"""The gRPC load generator: a few spawned processes, each running asyncio with either many
closed-loop clients (a client sends its next call as soon as the previous one is answered) or
an open-loop schedule (calls launched at a fixed rate whatever is still outstanding)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import signal
import time
import traceback
import uuid
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import grpc

from marketplace.catalog.v1 import catalog_pb2
from marketplace.order.v1 import order_pb2
from tests.bench.config import HOT_PRODUCT_N, PRODUCT_COUNT, product_id

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
GET_PRODUCT = "/marketplace.catalog.v1.CatalogService/GetProduct"
CREATE_ORDER = "/marketplace.order.v1.OrderService/CreateOrder"
KINDS = ("noop", "catalog-read", "order-spread", "flash-sale")
CALL_TIMEOUT_SECONDS = 60.0
LATE_LAUNCH_MS = 5.0

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerSpec:
    kind: str
    target: str
    clients: int
    first_client: int  # global index of this process's first client: picks its token
    tokens: tuple[str, ...]
    channels: int
    event_loop: str  # uvloop or asyncio
    seed: int
    # Open loop: calls per second this process launches (0: closed loop), and where in the
    # first interval its schedule starts (0..1), so processes do not launch in lockstep.
    rate: float = 0.0
    phase: float = 0.0


@dataclass
class LoadResult:
    """What the clients saw; `window` is the measured interval, `total` everything including
    warm-up and the calls still in flight when the interval ended.

    Closed loop: `ok_window`, `errors_window` and the latencies are of calls answered within
    the window. Open loop: `ok_window` still counts successes answered within the window (the
    achieved rate), but the latencies and `errors_window` are of the calls *scheduled* within
    it, however late they were answered, each latency measured from the scheduled send time
    (so a call waiting behind others, in the server or in the generator, counts its wait)."""

    ok_total: int = 0
    errors_total: Counter[str] = field(default_factory=Counter)
    ok_window: int = 0
    errors_window: Counter[str] = field(default_factory=Counter)
    latencies_ms: array[float] = field(default_factory=lambda: array("f"))
    # Open loop: calls scheduled within the window, and how late the generator launched them.
    scheduled_window: int = 0
    launched_late: int = 0  # more than LATE_LAUNCH_MS after their scheduled time
    max_launch_lag_ms: float = 0.0

    def merge(self, other: LoadResult) -> None:
        self.ok_total += other.ok_total
        self.errors_total.update(other.errors_total)
        self.ok_window += other.ok_window
        self.errors_window.update(other.errors_window)
        self.latencies_ms.extend(other.latencies_ms)
        self.scheduled_window += other.scheduled_window
        self.launched_late += other.launched_late
        self.max_launch_lag_ms = max(self.max_launch_lag_ms, other.max_launch_lag_ms)


# --- inside a generator process -------------------------------------------------------------


def _request_factory(kind: str, rng: random.Random) -> tuple[str, Callable[[], bytes]]:
    """The method and a function building each call's serialized request."""
    if kind == "noop":
        return HEALTH_CHECK, lambda: b""
    if kind == "catalog-read":
        ids = [product_id(n) for n in range(1, PRODUCT_COUNT + 1)]
        return GET_PRODUCT, lambda: catalog_pb2.GetProductRequest(
            id=rng.choice(ids)
        ).SerializeToString()
    if kind == "order-spread":
        ids = [product_id(n) for n in range(1, PRODUCT_COUNT + 1)]

        def spread() -> bytes:
            lines = rng.sample(ids, rng.randint(1, 3))
            return order_pb2.CreateOrderRequest(
                request_id=str(uuid.uuid4()),
                items=[order_pb2.OrderItem(product_id=line, quantity=1) for line in lines],
            ).SerializeToString()

        return CREATE_ORDER, spread
    if kind == "flash-sale":
        hot = product_id(HOT_PRODUCT_N)

        def flash() -> bytes:
            return order_pb2.CreateOrderRequest(
                request_id=str(uuid.uuid4()),
                items=[order_pb2.OrderItem(product_id=hot, quantity=1)],
            ).SerializeToString()

        return CREATE_ORDER, flash
    raise ValueError(f"unknown load kind {kind!r}")


async def _client(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    make_request: Callable[[], bytes],
    metadata: tuple[tuple[str, str], ...] | None,
    window: tuple[float, float],
    result: LoadResult,
) -> None:
    start, end = window
    clock = time.monotonic
    latencies = result.latencies_ms
    while clock() < end:
        request = make_request()
        code: str | None = None
        sent = clock()
        try:
            await call(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        answered = clock()
        in_window = start <= answered < end
        if code is None:
            result.ok_total += 1
            if in_window:
                result.ok_window += 1
                latencies.append((answered - sent) * 1000.0)
        else:
            result.errors_total[code] += 1
            if in_window:
                result.errors_window[code] += 1


async def _open_loop(
    calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]],
    make_request: Callable[[], bytes],
    metadata: list[tuple[tuple[str, str], ...] | None],
    rate: float,
    phase: float,
    window: tuple[float, float],
    result: LoadResult,
) -> None:
    """Launches call n at `begin + n / rate` from now until the window ends, never waiting
    for earlier calls, then waits for every call still outstanding."""
    start, end = window
    clock = time.monotonic
    interval = 1.0 / rate
    latencies = result.latencies_ms
    pending: set[asyncio.Future[None]] = set()

    async def one(
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
        request: bytes,
        metadata: tuple[tuple[str, str], ...] | None,
        scheduled: float,
    ) -> None:
        code: str | None = None
        try:
            await call(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        answered = clock()
        measured = start <= scheduled < end
        if code is None:
            result.ok_total += 1
            if start <= answered < end:
                result.ok_window += 1
            if measured:
                latencies.append((answered - scheduled) * 1000.0)
        else:
            result.errors_total[code] += 1
            if measured:
                result.errors_window[code] += 1

    begin = clock() + phase * interval
    number = 0
    due = begin
    while due < end:
        now = clock()
        while due <= now and due < end:
            if due >= start:
                result.scheduled_window += 1
                lag_ms = (now - due) * 1000.0
                if lag_ms > LATE_LAUNCH_MS:
                    result.launched_late += 1
                result.max_launch_lag_ms = max(result.max_launch_lag_ms, lag_ms)
            task = asyncio.ensure_future(
                one(
                    calls[number % len(calls)],
                    make_request(),
                    metadata[number % len(metadata)],
                    due,
                )
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
            number += 1
            due = begin + number * interval  # no drift from summing intervals
        await asyncio.sleep(max(0.0, due - clock()))
    if pending:
        await asyncio.gather(*pending)


async def _generate(spec: WorkerSpec, conn: Connection) -> LoadResult:
    rng = random.Random(spec.seed)
    method, make_request = _request_factory(spec.kind, rng)
    # Separate TCP connections per channel, so several server processes sharing the port
    # through SO_REUSEPORT all get some of them.
    channels = [
        grpc.aio.insecure_channel(spec.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(spec.channels)
    ]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(channel.channel_ready() for channel in channels)), timeout=30
        )
        calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            channel.unary_unary(method) for channel in channels
        ]
        conn.send("ready")
        window: tuple[float, float] = conn.recv()  # blocks until every process is ready
        result = LoadResult()
        # One token per client, as in the closed loop; open-loop calls take them in turn.
        metadata: list[tuple[tuple[str, str], ...] | None] = []
        for index in range(spec.clients):
            number = spec.first_client + index
            if spec.kind in ("order-spread", "flash-sale"):
                token = spec.tokens[number % len(spec.tokens)]
                metadata.append((("authorization", f"Bearer {token}"),))
            else:
                metadata.append(None)
        if spec.rate > 0:
            await _open_loop(calls, make_request, metadata, spec.rate, spec.phase, window, result)
            return result
        await asyncio.gather(
            *(
                _client(calls[index % len(calls)], make_request, metadata[index], window, result)
                for index in range(spec.clients)
            )
        )
        return result
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a spawned generator process; the parent stops it on Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if spec.event_loop == "uvloop":
            import uvloop

            result = uvloop.run(_generate(spec, conn))
        else:
            result = asyncio.run(_generate(spec, conn))
        conn.send(("done", result))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# --- in the parent --------------------------------------------------------------------------


def run_grpc_load(
    *,
    kind: str,
    target: str,
    concurrency: int,
    tokens: tuple[str, ...],
    processes: int,
    channels_per_process: int,
    event_loop: str,
    warmup: float,
    seconds: float,
    sample: Callable[[list[int]], T],
    rate: float = 0.0,
) -> tuple[LoadResult, T, T]:
    """Runs `concurrency` clients over `processes` generator processes for warm-up + the
    measured `seconds`; calls `sample(generator_pids)` at both ends of the measured interval
    and returns the merged client results with the two samples. With a `rate`, the processes
    instead launch that many calls per second in all (open loop), over the same tokens."""
    context = multiprocessing.get_context("spawn")
    processes = max(1, min(processes, concurrency))
    workers: list[tuple[Any, Connection]] = []
    finished = False
    try:
        for number in range(processes):
            first = concurrency * number // processes
            last = concurrency * (number + 1) // processes
            spec = WorkerSpec(
                kind=kind,
                target=target,
                clients=last - first,
                first_client=first,
                tokens=tokens,
                channels=channels_per_process,
                event_loop=event_loop,
                seed=random.randrange(2**32),
                rate=rate / processes,
                phase=number / processes,
            )
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=worker_main, args=(spec, child_end), name=f"bench-{kind}-{number}"
            )
            process.start()
            child_end.close()
            workers.append((process, parent_end))
        for process, conn in workers:
            if not conn.poll(60):
                raise TimeoutError(f"generator {process.name} did not get ready")
            message = conn.recv()
            if message != "ready":
                raise RuntimeError(f"generator {process.name} failed:\n{message[1]}")
        start = time.monotonic() + 0.05 + warmup
        end = start + seconds
        for _, conn in workers:
            conn.send((start, end))
        pids = [process.pid for process, _ in workers]
        time.sleep(max(0.0, start - time.monotonic()))
        first_sample = sample(pids)
        time.sleep(max(0.0, end - time.monotonic()))
        last_sample = sample(pids)
        merged = LoadResult()
        for process, conn in workers:
            if not conn.poll(CALL_TIMEOUT_SECONDS + 30):
                raise TimeoutError(f"generator {process.name} did not finish")
            status, payload = conn.recv()
            if status != "done":
                raise RuntimeError(f"generator {process.name} failed:\n{payload}")
            merged.merge(payload)
        finished = True
        return merged, first_sample, last_sample
    finally:
        for process, conn in workers:
            process.join(5 if finished else 0)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
