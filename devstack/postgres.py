"""PostgreSQL for the stack and the tests: a private server from the pgserver package, or
DATABASE_URL's; throwaway migrated databases on it; the demo catalog."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from devstack import DATA_DIR
from server.db.engine import upgrade_schema

# Fixed ids so the README's examples work exactly as written.
DEMO_PRODUCTS = (
    ("00000000-0000-4000-8000-000000000001", "MUG-CLASSIC", "Classic mug", "12.50", 100),
    ("00000000-0000-4000-8000-000000000002", "TEE-BLACK-M", "Black tee, M", "19.99", 50),
    ("00000000-0000-4000-8000-000000000003", "SNEAKER-LTD", "Limited sneaker", "180.00", 10),
    ("00000000-0000-4000-8000-000000000004", "POSTER-A2", "Poster, A2", "9.00", 200),
)


class EmbeddedPostgres:
    """A private PostgreSQL from the pgserver package, with stop/start for outage drills."""

    def __init__(self, data_dir: Path, *, delete_on_exit: bool = False) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at pgserver's import when XDG_RUNTIME_DIR is unset (it
            # falls back to /tmp), which would greet every `make run` with a warning.
            warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")
            from pgserver.postgres_server import get_server

        data_dir.mkdir(parents=True, exist_ok=True)
        # Stopping and deleting are ours (close()); pgserver's own stop misreads a stopped
        # postmaster not yet reaped (a zombie) as running and logs a failed `pg_ctl stop`.
        self._server = get_server(data_dir, cleanup_mode=None)
        self.data_dir = data_dir
        self._delete_on_exit = delete_on_exit

    @property
    def url(self) -> str:
        uri: str = self._server.get_uri()
        return uri

    def stop(self) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-w",
                "-m",
                "fast",
                "stop",
            ],
            check=True,
            capture_output=True,
            user=self._server.system_user,
        )

    def start(self) -> None:
        self._server.ensure_postgres_running()

    @property
    def system_user(self) -> str | None:
        """The account PostgreSQL runs as: pgserver's own when we are root, else ours."""
        user: str | None = self._server.system_user
        return user

    def close(self) -> None:
        """Stops the server, lets pgserver forget it, and deletes the data when asked to.

        pgserver alone stops a server only if no other process ever attached to it, which
        left servers running after tests; whoever owns the data directory stops it here.
        """
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()  # fails only when it is not running
        self._server.cleanup()
        if self._delete_on_exit:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def database() -> Iterator[str]:
    """`make run`'s database: DATABASE_URL, or the embedded server kept under .data/."""
    if url := os.environ.get("DATABASE_URL"):
        yield url
        return
    with EmbeddedPostgres(DATA_DIR / "pgdata") as postgres:
        yield postgres.url


@contextlib.contextmanager
def database_with_replica() -> Iterator[tuple[str, str]]:
    """`make run PG_REPLICA=1`'s database and a streaming replica of it, both embedded
    under .data/ (the replica made afresh each run); their URLs."""
    if os.environ.get("DATABASE_URL"):
        raise RuntimeError("PG_REPLICA=1 starts a replica of the embedded PostgreSQL only")
    with EmbeddedPostgres(DATA_DIR / "pgdata") as postgres:
        replica = StreamingReplica(postgres, DATA_DIR / "pgdata-replica")
        try:
            yield postgres.url, replica.url
        finally:
            replica.close()


def create_database(server_url: str, prefix: str) -> str:
    """A new database named `prefix` + a random suffix on `server_url`, migrated; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    upgrade_schema(url)
    return url


def drop_database(server_url: str, url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed_demo_catalog(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        for product_id, sku, name, price, stock in DEMO_PRODUCTS:
            conn.execute(
                """
                INSERT INTO products (id, sku, name, description, price_currency, price_amount,
                                      stock, create_time, update_time)
                VALUES (%s, %s, %s, '', 'USD', %s, %s, now(), now())
                ON CONFLICT DO NOTHING
                """,
                (product_id, sku, name, Decimal(price), stock),
            )


class StreamingReplica:
    """A hot standby of `primary`, from the same pgserver binaries: `pg_basebackup -R`
    (streaming, from the primary's socket) into `data_dir`, then a postmaster of its own
    with its socket in `data_dir`. stop/start for drills; close() deletes it."""

    def __init__(self, primary: EmbeddedPostgres, data_dir: Path) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        self._bin = POSTGRES_BIN_PATH
        self._user = primary.system_user
        self.data_dir = data_dir
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True, mode=0o700)
        if self._user is not None:
            shutil.chown(data_dir, self._user)
        subprocess.run(
            [
                str(self._bin / "pg_basebackup"),
                "--host",
                str(primary.data_dir),
                "--username",
                "postgres",
                "--pgdata",
                str(data_dir),
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
            ],
            check=True,
            capture_output=True,
            user=self._user,
        )
        # The primary keeps its socket in its data folder, whose lock file came along.
        for copied in data_dir.glob(".s.PGSQL.*"):
            copied.unlink()
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres:@/postgres?host={self.data_dir}"

    def start(self) -> None:
        # A socket in its own folder only: the primary's TCP address is the primary's.
        options = f"-k {self.data_dir} -c listen_addresses=''"
        self._pg_ctl("-w", "-l", str(self.data_dir / "replica.log"), "-o", options, "start")

    def stop(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [str(self._bin / "pg_ctl"), "-D", str(self.data_dir), *args],
            check=True,
            capture_output=True,
            user=self._user,
        )
