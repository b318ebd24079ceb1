"""Shared fixtures: a real PostgreSQL (embedded via pgserver, or TEST_DATABASE_URL), a fresh
database per test session with migrations applied, and development tokens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import jwt
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from devstack.postgres import EmbeddedPostgres, create_database, drop_database
from server.api.auth import issue_development_token
from server.db.driver import DriverPool
from server.db.engine import create_engine

JWT_SECRET = "test-secret-" + "x" * 32
T = TypeVar("T")


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
        return
    with (
        tempfile.TemporaryDirectory(prefix="marketplace-pg-") as scratch,
        EmbeddedPostgres(Path(scratch) / "pgdata", delete_on_exit=True) as postgres,
    ):
        yield postgres.url


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    url = create_database(postgres_server_url, "marketplace_test")
    yield url
    drop_database(postgres_server_url, url)


@dataclass(frozen=True)
class Tokens:
    secret: str

    def customer(self, subject: str = "alice") -> str:
        return issue_development_token(self.secret, subject, ["customer"], lifetime_seconds=3600)

    def admin(self, subject: str = "root") -> str:
        return issue_development_token(self.secret, subject, ["admin"], lifetime_seconds=3600)

    def expired(self, subject: str = "alice") -> str:
        now = int(time.time())
        payload = {"sub": subject, "roles": ["customer"], "iat": now - 7200, "exp": now - 3600}
        return jwt.encode(payload, self.secret, algorithm="HS256")

    def wrong_signature(self, subject: str = "alice") -> str:
        return issue_development_token(
            secrets.token_urlsafe(32), subject, ["customer", "admin"], lifetime_seconds=3600
        )


@pytest.fixture(scope="session")
def tokens() -> Tokens:
    return Tokens(JWT_SECRET)


# The server's two pools, as tests build them: generous timeouts, a small pool.
_POOL_TIMEOUT_SECONDS = 10
_CONNECT_TIMEOUT_SECONDS = 3
_STATEMENT_TIMEOUT_MS = 10_000


def sqlalchemy_engine(database_url: str, *, pool_size: int, max_overflow: int = 0) -> AsyncEngine:
    """SQLAlchemy's pool, built as the server builds it."""
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout_seconds=_POOL_TIMEOUT_SECONDS,
        connect_timeout_seconds=_CONNECT_TIMEOUT_SECONDS,
        statement_timeout_ms=_STATEMENT_TIMEOUT_MS,
    )


@contextlib.asynccontextmanager
async def hot_path_pool(
    database_url: str, *, size: int, statement_timeout_ms: int = _STATEMENT_TIMEOUT_MS
) -> AsyncIterator[DriverPool]:
    """The psycopg pool the order transaction and product lookups run on, opened."""
    pool = DriverPool(
        database_url,
        size=size,
        timeout_seconds=_POOL_TIMEOUT_SECONDS,
        connect_timeout_seconds=_CONNECT_TIMEOUT_SECONDS,
        statement_timeout_ms=statement_timeout_ms,
    )
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close()


def insert_product(
    database_url: str,
    *,
    stock: int,
    price: str = "10.00",
    currency: str = "USD",
    sku: str | None = None,
) -> str:
    """Seeds a product straight into the database (test arrangement, not the API)."""
    product_id = str(uuid.uuid4())
    with psycopg.connect(database_url) as conn:
        conn.execute(
            """
            INSERT INTO products (id, sku, name, description, price_currency, price_amount,
                                  stock, create_time, update_time)
            VALUES (%s, %s, 'Test product', '', %s, %s, %s, now(), now())
            """,
            (product_id, sku or f"SKU-{product_id[:8]}", currency, Decimal(price), stock),
        )
    return product_id


def table_snapshot(database_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, to prove a refused request changed nothing."""
    tables = (
        "products",
        "orders",
        "order_lines",
        "stock_adjustments",
        "payments",
        "refunds",
        "provider_events",
    )
    with psycopg.connect(database_url) as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in tables
        }


def stock_of(database_url: str, product_id: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT stock FROM products WHERE id = %s", (product_id,)).fetchone()
    assert row is not None
    stock: int = row[0]
    return stock


@contextlib.contextmanager
def notification_queue_held(database_url: str) -> Iterator[None]:
    """PostgreSQL's notification queue kept from emptying for the block: a listener sits in
    a transaction (it reads no notifications until it ends, so none can leave the queue),
    behind about 4 of the queue's 8 kB pages of notifications."""
    with (
        psycopg.connect(database_url, autocommit=True) as stalled,
        psycopg.connect(database_url, autocommit=True) as sender,
    ):
        stalled.execute("LISTEN marketplace_test_stalled")
        with stalled.transaction():
            stalled.execute("SELECT 1")
            # Each payload differs, or PostgreSQL would fold them into one.
            sender.execute(
                "SELECT pg_notify('marketplace_test_stalled', repeat('x', 7000) || n)"
                " FROM generate_series(1, 5) AS n"
            )
            yield


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    within: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """The first truthy result of `check`, polled for at most `within` seconds: for state
    in another process or behind a background task, which no asyncio.Event can stand for."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {within} s waiting for {what}")
        await asyncio.sleep(interval)


async def until(condition: Callable[[], bool], *, within: float = 10.0, what: str) -> None:
    """`eventually` for a condition checked without I/O."""

    async def check() -> bool:
        return condition()

    await eventually(check, within=within, what=what, interval=0.01)
