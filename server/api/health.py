"""grpc.health.v1 status that follows the database: SERVING only while PostgreSQL answers;
and while it does not, calls that need it are refused at once instead of each waiting out
the pools' timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import psycopg
import structlog
from grpc_health.v1 import health, health_pb2
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

_log = structlog.get_logger("marketplace.health")
# After an unanswered probe, and while the database is down, it is probed this often at
# most: a failure is confirmed (or not) at once, and calls are admitted again soon after
# the database is back.
_RECOVERY_PROBE_SECONDS = 0.1
# Unanswered probes in a row that make the database count as down. One is not an outage:
# on a machine saturated by load a probe can outwait its timeout (seen in `make bench`,
# where a worker then refused 361-1,002 reads of a database that was up).
FAILURES_TO_GO_DOWN = 3


class DatabaseDown(Exception):
    """The probes found the database down: a call that needs it is refused before it waits
    for a connection (DB_POOL_TIMEOUT) that cannot come."""

    def __init__(self, retry_after_seconds: float) -> None:
        super().__init__("the health probes found the database down")
        self.retry_after_seconds = retry_after_seconds


class DatabaseHealth:
    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        engine: AsyncEngine,
        service_names: Iterable[str],
        interval_seconds: float,
        *,
        before_serving_again: Callable[[], Awaitable[None]] | None = None,
        on_probe: Callable[[bool], None] = lambda answered: None,
    ) -> None:
        """`on_probe` hears every probe's result (marketplace_database_up): unlike the calls
        refused, it tells an outage while no call arrives."""
        self._servicer = servicer
        self._engine = engine
        # "" is the whole server, as grpc_health_probe and Envoy ask by default.
        self._names = ["", *service_names]
        self._services = frozenset(service_names)
        self._interval = interval_seconds
        self._recovery_interval = min(interval_seconds, _RECOVERY_PROBE_SECONDS)
        self._serving: bool | None = None
        self._failures = 0
        # Run when the database answers again after an outage, before calls are admitted.
        self._before_serving_again = before_serving_again
        self._on_probe = on_probe

    def admit(self, method: str) -> None:
        """Raises DatabaseDown for a call of one of the database's services (`method` is
        grpc's "/package.Service/Method") while the database counts as down."""
        if self._serving is False and method.split("/")[1] in self._services:
            raise DatabaseDown(self._recovery_interval)

    async def check_once(self) -> bool:
        """Probes the database once and says whether it answered. It counts as down
        (NOT_SERVING, its services' calls refused) after FAILURES_TO_GO_DOWN unanswered
        probes in a row, and as up again at the first answer."""
        try:
            async with asyncio.timeout(max(self._interval * 2, 2.0)):
                async with self._engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                if self._serving is False and self._before_serving_again is not None:
                    await self._before_serving_again()
            answered = True
            self._failures = 0
        except (SQLAlchemyError, psycopg.Error, OSError, TimeoutError) as error:
            answered = False
            self._failures += 1
            if self._serving is not False:
                _log.warning(
                    "database probe unanswered", error=repr(error), in_a_row=self._failures
                )
        if answered:
            serving: bool | None = True
        elif self._failures >= FAILURES_TO_GO_DOWN:
            serving = False
        else:
            serving = self._serving  # too soon to tell: as it was
        self._on_probe(serving is not False)
        if serving is not None:
            await self._publish(serving)
        return answered

    async def _publish(self, healthy: bool) -> None:
        if healthy == self._serving:
            return
        if healthy and self._serving is False:
            _log.info("database reachable again")
        elif not healthy:
            _log.warning("database unreachable", probes_unanswered=self._failures)
        self._serving = healthy
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self._servicer.set(name, status)

    async def run(self) -> None:
        while True:
            healthy = await self.check_once()
            await asyncio.sleep(self._interval if healthy else self._recovery_interval)

    async def shut_down(self) -> None:
        """Tells load balancers to stop sending new calls while in-flight ones drain."""
        await self._servicer.enter_graceful_shutdown()
