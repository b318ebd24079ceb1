"""Builds the async engine and applies migrations; nothing here connects at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def sqlalchemy_url(database_url: str) -> str:
    """Accepts the libpq-style URLs people have (postgres://, postgresql://) and pins the
    psycopg 3 driver, which serves both the async server and sync migrations."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    raise ValueError("DATABASE_URL must start with postgresql:// or postgres://")


def create_engine(
    database_url: str,
    *,
    pool_size: int,
    max_overflow: int,
    pool_timeout_seconds: float,
    connect_timeout_seconds: int,
    statement_timeout_ms: int,
) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(database_url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout_seconds,
        # No pre-ping: it would cost a round trip per checkout. A connection that died with
        # a database restart fails once (UNAVAILABLE, retryable); SQLAlchemy then recognises
        # the disconnect and discards every pooled connection, so the pool heals itself.
        pool_pre_ping=False,
        connect_args=connect_options(connect_timeout_seconds, statement_timeout_ms),
    )


def connect_options(connect_timeout_seconds: int, statement_timeout_ms: int) -> dict[str, Any]:
    """libpq connection parameters shared by SQLAlchemy's pool and the hot-path pool.

    Every statement is planned for its own parameters (plan_cache_mode=force_custom_plan).
    psycopg prepares a statement once it has run five times; PostgreSQL's default then plans
    it for its parameters five more times and may settle on a generic plan made for the
    tables as they were at that moment, kept until an ANALYZE of a table invalidates it
    (autovacuum's, a minute or more later) or the connection closes. A server started on an
    empty orders table looked request ids up by reading every order, in each batch, with the
    batch's product rows locked (tests/integration/test_order_plans.py). The batch's arrays also
    range from 1 to ORDER_BATCH_MAX elements, which no single plan fits. The price is
    planning every time: EXPLAIN puts it at 0.23 ms for the order batch's three statements,
    and a batch of one order measured about 1 ms more PostgreSQL CPU per transaction; under
    full load the difference per order was within the benchmark's noise.
    """
    return {
        "connect_timeout": connect_timeout_seconds,
        "options": (
            f"-c statement_timeout={statement_timeout_ms} -c plan_cache_mode=force_custom_plan"
        ),
        "application_name": "marketplace",
    }


def libpq_url(database_url: str) -> str:
    """DATABASE_URL as libpq (and so psycopg) reads it."""
    return "postgresql://" + sqlalchemy_url(database_url)[len("postgresql+psycopg://") :]


def upgrade_schema(database_url: str) -> None:
    """Runs every pending Alembic migration."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = database_url
    command.upgrade(config, "head")
