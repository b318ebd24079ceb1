"""Use cases against a real PostgreSQL, without gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from server.db.driver import DriverPool
from server.db.engine import create_engine
from server.services.catalog import Catalog
from server.services.orders import Orders


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(
        database_url,
        pool_size=10,
        max_overflow=5,
        pool_timeout_seconds=10,
        connect_timeout_seconds=3,
        statement_timeout_ms=10_000,
    )
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def hot_path(database_url: str) -> AsyncIterator[DriverPool]:
    """The psycopg pool the order transaction and product lookups run on, as in the server."""
    pool = DriverPool(
        database_url,
        size=4,
        timeout_seconds=10,
        connect_timeout_seconds=3,
        statement_timeout_ms=10_000,
    )
    await pool.open()
    yield pool
    await pool.close()


@pytest.fixture
def orders(engine: AsyncEngine, hot_path: DriverPool) -> Orders:
    return Orders(engine, hot_path)


@pytest.fixture
def catalog(engine: AsyncEngine, hot_path: DriverPool) -> Catalog:
    return Catalog(engine, hot_path)
