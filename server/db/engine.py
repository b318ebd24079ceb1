"""Builds the async engine and applies migrations; nothing here connects at import time."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
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


def autocommit_reads(engine: AsyncEngine) -> AsyncEngine:
    """The engine for single-statement reads: autocommit, so no BEGIN/ROLLBACK round trips
    around them."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def connect_options(
    connect_timeout_seconds: int,
    statement_timeout_ms: int,
    *,
    idle_in_transaction_timeout_ms: int = 0,
) -> dict[str, Any]:
    """libpq connection parameters shared by SQLAlchemy's pool and the hot-path pool
    (0: no idle-in-transaction limit)."""
    return {
        "connect_timeout": connect_timeout_seconds,
        "options": f"-c statement_timeout={statement_timeout_ms}"
        f" -c idle_in_transaction_session_timeout={idle_in_transaction_timeout_ms}",
        "application_name": "marketplace",
    }


def libpq_url(database_url: str) -> str:
    """DATABASE_URL as libpq (and so psycopg) reads it."""
    return "postgresql://" + sqlalchemy_url(database_url)[len("postgresql+psycopg://") :]


def dedicated_connection(
    database_url: str, *, connect_timeout_seconds: int, statement_timeout_ms: int
) -> Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]:
    """Opens an autocommit session outside the pools, for work that holds one for long: the
    product cache's listener, the outbox relay's leadership."""
    return functools.partial(
        psycopg.AsyncConnection.connect,
        libpq_url(database_url),
        autocommit=True,
        **connect_options(connect_timeout_seconds, statement_timeout_ms),
        # Over TCP, a peer gone without a FIN is noticed by the kernel too, not only by the
        # listener's heartbeat.
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    )


def upgrade_schema(database_url: str) -> None:
    """Runs every pending Alembic migration."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = database_url
    command.upgrade(config, "head")
