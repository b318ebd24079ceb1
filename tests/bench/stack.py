"""The system under test: PostgreSQL with a throwaway seeded database, the server process(es)
or a fleet of replicas behind Envoy, Envoy, and the CPU accounting of every process tree
involved."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import httpx
import psutil  # type: ignore[import-untyped]
import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import make_url

from devstack.envoy import EdgeLimits, render_envoy_config, start_envoy, wait_for_envoy
from devstack.fleet import Fleet
from devstack.nats import nats_url, start_nats, wait_for_nats
from devstack.postgres import EmbeddedPostgres, create_database, drop_database
from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from server.db.engine import connect_options
from tests.bench.config import (
    CURRENCY,
    HOT_PRODUCT_N,
    INITIAL_STOCK,
    REPO_ROOT,
    product_id,
    product_price,
    product_sku,
)
from tests.stack import WEBHOOK_SECRET

# pgbench opens up to 256 connections while each server process keeps its pool open.
EMBEDDED_MAX_CONNECTIONS = 500


# --- CPU accounting -------------------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants; empty when it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_by_process(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and each of its descendants, each including its
    own reaped children (an exited child's time moves into its parent's children_* counters,
    so the sum stays whole)."""
    seconds = {}
    for process in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = process.cpu_times()
            seconds[process.pid] = (
                times.user + times.system + times.children_user + times.children_system
            )
    return seconds


def tree_cpu_seconds(pid: int) -> float:
    return sum(tree_cpu_by_process(pid).values())


def tree_rss_mb(pid: int) -> list[float]:
    """Resident memory of each process in the tree, in MiB."""
    sizes = []
    for process in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            sizes.append(process.memory_info().rss / 2**20)
    return sizes


def wait_with_rusage(process: subprocess.Popen[bytes], timeout: float) -> float:
    """Waits for a child and returns the CPU seconds it (and its reaped children) used."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            process.kill()
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            raise TimeoutError(f"{process.args!r} did not finish in {timeout:.0f} s")
        time.sleep(0.05)


# --- PostgreSQL -----------------------------------------------------------------------------


@dataclass
class Database:
    """The throwaway benchmark database and how to reach it."""

    url: str
    postmaster_pid: int | None  # None when PostgreSQL is not on this machine
    max_connections: int

    def pgbench_connection(self) -> tuple[list[str], dict[str, str]]:
        """pgbench's -h/-p/-U/-d arguments and environment for this database."""
        params = conninfo_to_dict(make_url(self.url).render_as_string(hide_password=False))
        args: list[str] = []
        env: dict[str, str] = {}
        if host := params.get("host"):
            args += ["-h", str(host)]
        if port := params.get("port"):
            args += ["-p", str(port)]
        args += ["-U", str(params.get("user") or "postgres"), "-d", str(params["dbname"])]
        if password := params.get("password"):
            env["PGPASSWORD"] = str(password)
        # pgbench -M prepared cannot leave the request-id lookup unprepared as the server
        # does (server/services/orders.py), and a generic plan made on the still-empty
        # orders table would scan it. Planning every statement for its parameters instead
        # cost a batch of one the same PostgreSQL CPU as the server's mix
        # (`python -m tests.bench.order_batch 1`). A timeout of 0 is no limit.
        env["PGOPTIONS"] = (
            connect_options(0, 0)["options"] + " -c plan_cache_mode=force_custom_plan"
        )
        return args, env

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)


def _local_postmaster(url: str) -> int | None:
    """The postmaster's pid when PostgreSQL runs on this machine: the parent of our backend,
    confirmed by its working directory being the data directory."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid(), current_setting('data_directory')").fetchone()
        assert row is not None
        backend_pid, data_directory = row
        # While our connection, and so its backend, is still open.
        with contextlib.suppress(psutil.Error):
            postmaster = psutil.Process(backend_pid).parent()
            if (
                postmaster is not None
                and Path(postmaster.cwd()).resolve() == Path(data_directory).resolve()
            ):
                return int(postmaster.pid)
    return None


def _seed(url: str) -> None:
    with psycopg.connect(url) as conn:
        with conn.cursor().copy(
            "COPY products (id, sku, name, description, price_currency, price_amount, stock)"
            " FROM STDIN"
        ) as copy:
            for n in range(1, HOT_PRODUCT_N + 1):
                name = "Flash-sale product" if n == HOT_PRODUCT_N else f"Bench product {n}"
                row = (product_id(n), product_sku(n), name, "", CURRENCY, product_price(n))
                copy.write_row((*row, INITIAL_STOCK))
        # Only the seeded table. Analyzing the still-empty orders and order_lines would
        # record them as empty (reltuples 0, unlike a fresh deployment's "never analyzed"),
        # and each server connection's cached foreign-key check plan would then scan orders
        # sequentially, once per order, for the connection's whole life: measured at about
        # 1 ms of PostgreSQL CPU per order after 20,000 orders.
        conn.execute("ANALYZE products")


@contextlib.contextmanager
def bench_database(scratch: Path, server_url: str | None) -> Iterator[Database]:
    """A new database with migrations and the seeded catalog, dropped afterwards; on an
    embedded PostgreSQL (deleted afterwards) unless `server_url` is given."""
    with contextlib.ExitStack() as stack:
        if server_url is None:
            postgres = EmbeddedPostgres(scratch / "pgdata", delete_on_exit=True)
            stack.callback(postgres.close)
            with psycopg.connect(postgres.url, autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET max_connections = {EMBEDDED_MAX_CONNECTIONS}")
            postgres.stop()
            postgres.start()
            server_url = postgres.url
        with psycopg.connect(server_url, autocommit=True) as conn:
            max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
        with contextlib.redirect_stdout(io.StringIO()):
            url = create_database(server_url, "marketplace_bench")
        stack.callback(drop_database, server_url, url)
        _seed(url)
        yield Database(url, _local_postmaster(url), max_connections)


@contextlib.contextmanager
def bench_nats(scratch: Path) -> Iterator[str]:
    """A nats-server with JetStream for the bench's server (its URL): the outbox relay
    publishes the events of the runs with events, as in production."""
    port = free_port()
    with (scratch / "nats.log").open("ab") as log:
        process = start_nats(port, scratch / "nats", log=log)
        try:
            wait_for_nats(port, process)
            yield nats_url(port)
        finally:
            stop_process(process)


# --- the server and Envoy -------------------------------------------------------------------


class Serving(Protocol):
    """What a gRPC scenario loads: one server, or a fleet of replicas behind Envoy."""

    @property
    def target(self) -> str: ...

    @property
    def workers(self) -> int: ...  # server processes in all

    @property
    def root_pids(self) -> list[int]: ...  # each server's root process (its supervisor)


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    grpc_port: int
    workers: int
    log_path: Path
    # None when the process was started by something that closes its own handle (Fleet).
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def root_pids(self) -> list[int]:
        return [self.process.pid]

    def stop(self) -> None:
        """SIGTERM to the server (its supervisor stops its workers); whatever of the tree
        outlives it is killed."""
        try:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        try:
            stop_process(self.process, timeout=20)
        finally:
            for child in descendants:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.send_signal(signal.SIGKILL)
            if self._log is not None:
                self._log.close()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _listeners(pid: int, port: int) -> int:
    """How many processes of the tree have a socket listening on `port`."""
    count = 0
    for process in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if any(
                connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
                for connection in process.net_connections(kind="tcp")
            ):
                count += 1
    return count


def _wait_for_listeners(server: ServerProcess, workers: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (listening := _listeners(server.process.pid, server.grpc_port)) < workers:
        if time.monotonic() > deadline or server.process.poll() is not None:
            break
        time.sleep(0.1)
    return listening


def start_bare_server(workers: int, log_path: Path) -> ServerProcess:
    """The `grpc-bare` target (tests/bench/bare_server.py), as many processes as the server."""
    port = free_port()
    log = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.bare_server", str(port), str(workers)],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return _serving(ServerProcess(process, port, workers, log_path, log))


def start_bench_server(
    database: Database,
    *,
    secret: str,
    workers: int,
    pool_size: int,
    max_overflow: int,
    log_path: Path,
    settings: Mapping[str, str] | None = None,
) -> ServerProcess:
    env = {
        **_server_env(database, secret, workers, pool_size, max_overflow, settings),
        "GRPC_PORT": str(port := free_port()),
    }
    log = log_path.open("ab")
    return _serving(ServerProcess(start_server(env, log=log), port, workers, log_path, log))


def _server_env(
    database: Database,
    secret: str,
    workers: int,
    pool_size: int,
    max_overflow: int,
    settings: Mapping[str, str] | None,
) -> dict[str, str]:
    """Every bench server's environment but its port: the same for a fleet's replicas."""
    return {
        **(settings or {}),
        "DATABASE_URL": database.url,
        "MARKETPLACE_JWT_SECRET": secret,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,  # required; the bench sends no webhooks
        "METRICS_PORT": "0",
        "LOG_LEVEL": "WARNING",
        "SERVER_WORKERS": str(workers),
        "DB_POOL_SIZE": str(pool_size),
        "DB_MAX_OVERFLOW": str(max_overflow),
    }


def _serving(server: ServerProcess) -> ServerProcess:
    """Waits until `server` answers health checks, then until all its workers listen (it is
    stopped if it never answers)."""
    try:
        wait_for_grpc(server.grpc_port, server.process, timeout=60)
    except BaseException:
        server.stop()
        raise
    if server.workers > 1:
        # Health answers as soon as one worker listens; a client connecting before the others
        # do would send everything to that one (SO_REUSEPORT picks a listener per connection).
        listening = _wait_for_listeners(server, server.workers, timeout=60)
        if listening < server.workers:
            print(
                f"warning: {listening} of {server.workers} server processes listen on the port",
                file=sys.stderr,
                flush=True,
            )
    return server


@dataclass
class EnvoyProcess:
    process: subprocess.Popen[bytes]
    http_port: int
    _log: IO[bytes] = field(repr=False)
    admin_port: int = 0

    def stop(self) -> None:
        try:
            stop_process(self.process)
        finally:
            self._log.close()

    def upstream_calls(self) -> tuple[dict[int, int], int]:
        """Since Envoy started: calls it sent to each server port of the marketplace_grpc
        cluster (health checks are not counted), and how many of them were retries."""
        by_port: dict[int, int] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{self.admin_port}", timeout=5) as admin:
            clusters = admin.get("/clusters").raise_for_status().text
            retry_filter = r"^cluster\.marketplace_grpc\.upstream_rq_retry$"
            stats = admin.get("/stats", params={"filter": retry_filter}).raise_for_status().text
        for line in clusters.splitlines():
            # marketplace_grpc::127.0.0.1:<port>::rq_total::<count>
            cluster, _, rest = line.partition("::")
            address, _, stat = rest.partition("::")
            name, _, value = stat.partition("::")
            if cluster == "marketplace_grpc" and name == "rq_total":
                by_port[int(address.rpartition(":")[2])] = int(value)
        retries = int(stats.rpartition(":")[2]) if stats.strip() else 0
        return by_port, retries


def start_bench_envoy(grpc_port: int | Sequence[int], scratch: Path) -> EnvoyProcess:
    """Envoy in front of the server on `grpc_port`, or of each replica's port."""
    http_port, admin_port = free_port(), free_port()
    config = scratch / "envoy.yaml"
    # The bench runs no payments: the provider listener points at a port nobody serves.
    config.write_text(
        render_envoy_config(
            http_port=http_port,
            grpc_port=grpc_port,
            admin_port=admin_port,
            provider_proxy_port=free_port(),
            localstripe_port=free_port(),
            # The load comes from one address: per-client rates would measure the limiter.
            limits=EdgeLimits.without_rate_limits(),
        )
    )
    log = (scratch / "envoy.log").open("ab")
    envoy = EnvoyProcess(start_envoy(config, log=log), http_port, log, admin_port)
    try:
        wait_for_envoy(admin_port, envoy.process)
    except BaseException:
        envoy.stop()
        raise
    return envoy


@dataclass
class ServerFleet:
    """Independent server replicas on the bench database, each its own process group on its
    own port, behind an Envoy whose marketplace_grpc cluster lists them all (health checks,
    outlier detection and retries as in `make run REPLICAS=N`)."""

    replicas: list[ServerProcess]
    envoy: EnvoyProcess

    @property
    def target(self) -> str:
        # gRPC callers reach the cluster through Envoy's one listener, as in make run.
        return f"127.0.0.1:{self.envoy.http_port}"

    @property
    def workers(self) -> int:
        return sum(replica.workers for replica in self.replicas)

    @property
    def root_pids(self) -> list[int]:
        return [replica.process.pid for replica in self.replicas]

    def stop(self) -> None:
        try:
            self.envoy.stop()
        finally:
            for replica in self.replicas:
                replica.stop()


def start_bench_fleet(
    database: Database,
    *,
    secret: str,
    replicas: int,
    workers: int,
    pool_size: int,
    max_overflow: int,
    log_dir: Path,
    settings: Mapping[str, str] | None = None,
) -> ServerFleet:
    """`replicas` servers of `workers` processes each, started by devstack's Fleet (make
    run's), each with the single bench server's environment, and Envoy in front of them."""
    log_dir.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(
        _server_env(database, secret, workers, pool_size, max_overflow, settings),
        grpc_port=0,
        metrics_port=0,
        metrics_dir=log_dir / "metrics",
        log_dir=log_dir,
        free_ports=free_port,
    )
    servers: list[ServerProcess] = []
    try:
        for _ in range(replicas):
            replica = fleet.start_replica()
            log_path = log_dir / f"server-{replica.number}.log"
            servers.append(ServerProcess(replica.process, replica.grpc_port, workers, log_path))
        for server in servers:
            _serving(server)
        envoy = start_bench_envoy([server.grpc_port for server in servers], log_dir)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return ServerFleet(servers, envoy)
