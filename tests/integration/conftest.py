"""Use cases against a real PostgreSQL, without gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from devstack.postgres import create_database, drop_database
from server.db.driver import DriverPool
from server.services.catalog import Catalog
from server.services.use_cases import UseCases
from tests.conftest import hot_path_pool, sqlalchemy_engine
from tests.stack import NatsServer, running_nats
from tests.use_cases import wired


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = sqlalchemy_engine(database_url, pool_size=10, max_overflow=5)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def hot_path(database_url: str) -> AsyncIterator[DriverPool]:
    """The psycopg pool the order transaction and product lookups run on, as in the server."""
    async with hot_path_pool(database_url, size=4) as pool:
        yield pool


@pytest.fixture
def use_cases(engine: AsyncEngine, hot_path: DriverPool) -> UseCases:
    """Every use case, with a provider nothing reaches (these tests pay nothing)."""
    return wired(engine, hot_path)


@pytest.fixture
def catalog(engine: AsyncEngine, hot_path: DriverPool) -> Catalog:
    return Catalog(engine, hot_path)


@pytest.fixture
def events_database(postgres_server_url: str) -> Iterator[str]:
    """A database of its own per test, for the relay (which publishes every row it can see)
    and the consumers."""
    url = create_database(postgres_server_url, "marketplace_events")
    yield url
    drop_database(postgres_server_url, url)


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A nats-server of its own per test, with JetStream."""
    with running_nats() as server:
        yield server
