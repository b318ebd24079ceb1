"""grpc.health.v1 status that follows the database: SERVING only while PostgreSQL answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import structlog
from grpc_health.v1 import health, health_pb2
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

_log = structlog.get_logger("marketplace.health")


class DatabaseHealth:
    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        engine: AsyncEngine,
        service_names: Iterable[str],
        interval_seconds: float,
    ) -> None:
        self._servicer = servicer
        self._engine = engine
        # "" is the whole server, as grpc_health_probe and Envoy ask by default.
        self._names = ["", *service_names]
        self._interval = interval_seconds
        self._serving: bool | None = None

    async def check_once(self) -> bool:
        try:
            async with asyncio.timeout(max(self._interval * 2, 2.0)):
                async with self._engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            healthy = True
        except (SQLAlchemyError, OSError, TimeoutError) as error:
            if self._serving is not False:
                _log.warning("database unreachable", error=repr(error))
            healthy = False
        await self._publish(healthy)
        return healthy

    async def _publish(self, healthy: bool) -> None:
        if healthy == self._serving:
            return
        if healthy and self._serving is False:
            _log.info("database reachable again")
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
            await self.check_once()
            await asyncio.sleep(self._interval)

    async def shut_down(self) -> None:
        """Tells load balancers to stop sending new calls while in-flight ones drain."""
        await self._servicer.enter_graceful_shutdown()
