"""While the health probe finds the database down, calls of the services that need it are
refused before they wait for a connection; health and reflection are not."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health
from sqlalchemy.ext.asyncio import AsyncEngine

from devstack.postgres import EmbeddedPostgres
from devstack.processes import free_port
from server.api.errors import infrastructure_error_status
from server.api.health import FAILURES_TO_GO_DOWN, DatabaseDown, DatabaseHealth
from server.api.policy import ORDER_SERVICE
from server.observability import Metrics
from tests.conftest import sqlalchemy_engine

pytestmark = pytest.mark.integration

CREATE_ORDER = f"/{ORDER_SERVICE}/CreateOrder"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _health(engine: AsyncEngine) -> DatabaseHealth:
    return DatabaseHealth(health.aio.HealthServicer(), engine, (ORDER_SERVICE,), 1.0)


async def test_a_database_that_answers_admits_every_call(engine: AsyncEngine) -> None:
    database = _health(engine)
    assert await database.check_once()
    database.admit(CREATE_ORDER)
    database.admit(HEALTH_CHECK)


async def test_a_database_down_refuses_its_services_calls_at_once() -> None:
    """A port nobody listens on: the probe's connection is refused, as a stopped PostgreSQL's."""
    nowhere = sqlalchemy_engine(f"postgresql://nobody@127.0.0.1:{free_port()}/x", pool_size=1)
    try:
        database = _health(nowhere)
        database.admit(CREATE_ORDER)  # nothing known yet
        for _ in range(FAILURES_TO_GO_DOWN - 1):
            assert not await database.check_once()
            database.admit(CREATE_ORDER)  # one unanswered probe is not an outage
        assert not await database.check_once()
        with pytest.raises(DatabaseDown) as refused:
            database.admit(CREATE_ORDER)
        database.admit(HEALTH_CHECK)
    finally:
        await nowhere.dispose()

    status = infrastructure_error_status(refused.value)
    assert status is not None
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(details, bytes)
    proto = status_pb2.Status.FromString(details)
    assert proto.code == code_pb2.UNAVAILABLE
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert proto.details[0].Unpack(info)
    assert info.reason == "DATABASE_UNAVAILABLE"
    assert proto.details[1].Unpack(retry)
    assert retry.retry_delay.ToTimedelta().total_seconds() == pytest.approx(0.1)


async def test_marketplace_database_up_follows_the_probe_with_no_call_arriving() -> None:
    """A PostgreSQL of this test's own, stopped and started again; no call is made. Fewer
    unanswered probes in a row than make an outage (as when a saturated machine's probe
    outwaits its timeout) change nothing, and an answer starts the count again."""
    metrics = Metrics.create()

    def database_up() -> float | None:
        return metrics.registry.get_sample_value("marketplace_database_up")

    with tempfile.TemporaryDirectory(prefix="marketplace-gate-") as scratch:
        os.chmod(scratch, 0o755)  # noqa: S103  # pgserver's account reads it; removed at the end
        with EmbeddedPostgres(Path(scratch) / "pgdata") as postgres:
            engine = sqlalchemy_engine(postgres.url, pool_size=1)
            database = DatabaseHealth(
                health.aio.HealthServicer(),
                engine,
                (ORDER_SERVICE,),
                1.0,
                on_probe=lambda answered: metrics.database_up.set(1 if answered else 0),
            )
            try:
                assert await database.check_once()
                assert database_up() == 1
                postgres.stop()
                for _ in range(FAILURES_TO_GO_DOWN - 1):
                    assert not await database.check_once()
                    assert database_up() == 1
                    database.admit(CREATE_ORDER)
                postgres.start()
                assert await database.check_once()
                postgres.stop()
                for _ in range(FAILURES_TO_GO_DOWN - 1):
                    assert not await database.check_once()
                    assert database_up() == 1
                assert not await database.check_once()
                assert database_up() == 0
                with pytest.raises(DatabaseDown):
                    database.admit(CREATE_ORDER)
                postgres.start()
                assert await database.check_once()
                assert database_up() == 1
            finally:
                await engine.dispose()
