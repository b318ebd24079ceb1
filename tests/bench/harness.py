"""What every scenario runs against: the seeded database, the server (restarted between
scenario groups), Envoy once the REST scenario needs it, a fleet of replicas behind Envoy for
the fleet scenarios, the customers' tokens, and the rows measured so far."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import nats

from server.api.auth import issue_development_token
from server.events.nats import MARKETPLACE_STREAM
from server.services.product_cache import CHANNEL as PRODUCT_CHANGES
from tests.bench.config import CUSTOMER_SUBJECTS, JWT_SECRET_BYTES, BenchConfig
from tests.bench.cpu import CpuSample, sample_cpu
from tests.bench.pgbench import order_sql
from tests.bench.progress import progress
from tests.bench.report import Row
from tests.bench.stack import (
    Database,
    EnvoyProcess,
    ServerFleet,
    ServerProcess,
    Serving,
    start_bench_fleet,
    start_bench_server,
)

TOKEN_LIFETIME_SECONDS = 4 * 3600


class Bench:
    def __init__(self, config: BenchConfig, scratch: Path) -> None:
        self.config = config
        self.scratch = scratch
        self.secret = secrets.token_urlsafe(JWT_SECRET_BYTES)
        self.tokens = tuple(
            issue_development_token(
                self.secret,
                f"bench-customer-{number:03d}",
                ["customer"],
                lifetime_seconds=TOKEN_LIFETIME_SECONDS,
            )
            for number in range(CUSTOMER_SUBJECTS)
        )
        self.rows: list[Row] = []
        self.order_sql = order_sql()
        self.database: Database | None = None
        self.nats_url: str | None = None
        self.server: ServerProcess | None = None
        # Whether `server` writes events (OUTBOX_WRITES), for the checks.
        self.outbox_writes = True
        # A second server beside the main one, writing no events (OUTBOX_WRITES=false), so
        # runs with and without events can alternate without a restart between them.
        self.without_events: ServerProcess | None = None
        self.envoy: EnvoyProcess | None = None
        # Replicas behind an Envoy of their own; while it runs, gRPC scenarios load it.
        self.fleet: ServerFleet | None = None

    @property
    def db(self) -> Database:
        assert self.database is not None
        return self.database

    def sample(self, generator_pids: list[int]) -> CpuSample:
        """The CPU of the generators and of whatever server and Envoy run at this moment."""
        return sample_cpu(
            generator_pids,
            server=self.fleet or self.server,
            envoy=self.fleet.envoy if self.fleet else self.envoy,
            postmaster_pid=self.db.postmaster_pid,
        )

    def start_server(self, workers: int, settings: Mapping[str, str] | None = None) -> None:
        """The server with `workers` processes and any other `settings` (environment)."""
        self.server = self._started(workers, settings or {})
        self.outbox_writes = True

    def start_server_without_events(self) -> None:
        """The second server, OUTBOX_WRITES=false, as many processes as the main one."""
        if self.without_events is None:
            settings = {"OUTBOX_WRITES": "false"}
            self.without_events = self._started(self.config.server_workers, settings)

    @contextlib.contextmanager
    def serving_without_events(self) -> Iterator[None]:
        """Scenarios in the block run against the server that writes no events (the main
        one idles meanwhile)."""
        self.start_server_without_events()
        saved, self.server, self.outbox_writes = self.server, self.without_events, False
        try:
            yield
        finally:
            self.server, self.outbox_writes = saved, True

    @contextlib.contextmanager
    def serving_fleet(self, replicas: int, workers: int) -> Iterator[ServerFleet]:
        """gRPC scenarios in the block load `replicas` replicas of `workers` processes each,
        through Envoy (the main server idles meanwhile); all stopped at the end."""
        progress(
            f"starting a fleet: {replicas} replica(s) of SERVER_WORKERS={workers} behind Envoy ..."
        )
        settings = {"NATS_URL": self.nats_url} if self.nats_url else {}
        fleet = start_bench_fleet(
            self.db,
            secret=self.secret,
            replicas=replicas,
            workers=workers,
            pool_size=self.config.db_pool_size,
            max_overflow=self.config.db_max_overflow,
            log_dir=self.scratch / f"fleet-{replicas}",
            settings=settings,
        )
        self.fleet = fleet
        try:
            yield fleet
        finally:
            self.fleet = None
            fleet.stop()

    def _started(self, workers: int, settings: Mapping[str, str]) -> ServerProcess:
        extra = dict(settings)
        shown = " ".join(f"{name}={value}" for name, value in extra.items())
        progress(f"starting the server (SERVER_WORKERS={workers} {shown}) ...")
        return start_bench_server(
            self.db,
            secret=self.secret,
            workers=workers,
            pool_size=self.config.db_pool_size,
            max_overflow=self.config.db_max_overflow,
            log_path=self.scratch / f"server-{workers}{'-'.join(['', *extra.values()])}.log",
            settings={**extra, **({"NATS_URL": self.nats_url} if self.nats_url else {})},
        )

    def running_server(self) -> ServerProcess:
        """The server, which must still be running: a scenario against a dead server would
        only measure connection errors."""
        server = self.server
        assert server is not None
        _must_run(server)
        return server

    def serving(self) -> Serving:
        """Where gRPC load goes: the fleet while there is one, else the server; every
        process of it must still be running."""
        if self.fleet is None:
            return self.running_server()
        for replica in self.fleet.replicas:
            _must_run(replica)
        return self.fleet

    def stop_server(self) -> None:
        """Stops the server (and the one without events, a fleet, and Envoy)."""
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None
        if self.envoy is not None:
            self.envoy.stop()
            self.envoy = None
        for server in (self.server, self.without_events):
            if server is None:
                continue
            server.stop()
            if server.process.returncode not in (0, -signal.SIGTERM):
                progress(
                    f"the server exited with {server.process.returncode}; its log ends with:\n"
                    + server.log_tail()
                )
        self.server = self.without_events = None

    def announce_product_changes(self, on: bool) -> None:
        with self.db.connect() as conn:
            verb = "ENABLE" if on else "DISABLE"
            conn.execute(f"ALTER TABLE products {verb} TRIGGER products_updated_notify")
            if on:
                conn.execute("SELECT pg_notify(%s, '*')", (PRODUCT_CHANGES,))

    def settle_events(self, timeout: float = 120.0) -> None:
        """Waits until the events of earlier scenarios are published and every consumer has
        acknowledged them, so no scenario spends its time on another's events; says how
        many were left and how long they took (a relay or consumer falling behind). Without
        a NATS (BENCH_RELAY=0) the events stay in the outbox: nothing to wait for."""
        if not self.config.relay or self.nats_url is None:
            return
        started = time.monotonic()
        first = last = self._events_backlog()
        while last != (0, 0) and time.monotonic() - started < timeout:
            time.sleep(0.5)
            last = self._events_backlog()
        if first != (0, 0):
            progress(
                f"  events settled in {time.monotonic() - started:.1f} s: {first[0]} unpublished"
                f" and {first[1]} unacknowledged by consumers at first, {last[0]} and"
                f" {last[1]} now"
            )

    def _events_backlog(self) -> tuple[int, int]:
        """Outbox rows not yet published; messages consumers have not acknowledged yet."""
        with self.db.connect() as conn:
            row = conn.execute("SELECT count(*) FROM outbox WHERE publish_time IS NULL").fetchone()
        assert self.nats_url is not None
        return (row[0] if row else 0), asyncio.run(_unacknowledged(self.nats_url))

    def checkpoint(self) -> None:
        """Starts every write scenario from clean buffers, so no scenario inherits a
        checkpoint triggered by the one before."""
        with contextlib.suppress(Exception), self.db.connect() as conn:
            conn.execute("CHECKPOINT")

    def keep(self, row: Row) -> Row:
        """Adds a measured scenario's row to the report, and says what it measured."""
        self.rows.append(row)
        p99 = "-" if row.p99_ms is None else f"{row.p99_ms:.1f}"
        progress(
            f"  {row.scenario}: {row.throughput:.0f}/s, p99 {p99} ms, {row.errors} errors,"
            f" check {row.check} ({row.check_detail})"
        )
        return row


async def _unacknowledged(nats_url: str) -> int:
    client = await nats.connect(nats_url, allow_reconnect=False)
    try:
        consumers = await client.jetstream().consumers_info(MARKETPLACE_STREAM)
        return sum((info.num_pending or 0) + (info.num_ack_pending or 0) for info in consumers)
    finally:
        await client.close()


def _must_run(server: ServerProcess) -> None:
    if server.process.poll() is not None:
        raise RuntimeError(
            f"the server exited with {server.process.returncode}; its log ends with:\n"
            + server.log_tail()
        )
