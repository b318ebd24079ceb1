"""The stack the provider and end-to-end tests run against: localstripe (a Stripe emulator)
behind Envoy's fault-injecting `provider_egress` listener and, given a database, our server
as its own process behind Envoy's REST listener. Faults are switched at run time, and a look
at what localstripe actually holds bypasses Envoy, so that faults never blur the evidence."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from devstack.envoy import EdgeLimits, render_envoy_config, start_envoy, wait_for_envoy
from devstack.fleet import Fleet, Replica
from devstack.localstripe import (
    LOCALSTRIPE_API_KEY,
    WEBHOOK_PATH,
    register_localstripe_webhook,
    start_localstripe,
    wait_for_localstripe,
)
from devstack.mail import MailSink
from devstack.nats import ROUTE_PORT_OFFSET, nats_url, start_nats, wait_for_nats
from devstack.processes import free_port, free_ports, port_is_taken, stop_process
from devstack.server import start_server, wait_for_grpc
from devstack.tls import TlsFiles
from server.supervisor import WORKER_ENV
from tests.conftest import JWT_SECRET

WEBHOOK_SECRET = "whsec_e2e_" + "x" * 24
EGRESS_STATS = "http.provider_egress."


def _scope(confirm_only: bool) -> str:
    """Runtime key prefix: every provider request, or only PaymentIntent confirms (the
    second fault filter in envoy.yaml's provider_egress listener)."""
    return "fault.confirm" if confirm_only else "fault.http"


class FaultInjector:
    """The fault filter on Envoy's provider listener, through the admin runtime."""

    def __init__(self, admin_port: int) -> None:
        self._admin = f"http://127.0.0.1:{admin_port}"

    async def abort(
        self, http_status: int = 503, percent: int = 100, *, confirm_only: bool = False
    ) -> None:
        """Envoy answers `http_status` ("fault filter abort") without forwarding."""
        scope = _scope(confirm_only)
        await self._set(
            {f"{scope}.abort.abort_percent": percent, f"{scope}.abort.http_status": http_status}
        )

    async def delay(self, ms: int, percent: int = 100, *, confirm_only: bool = False) -> None:
        """Requests wait `ms` in Envoy before being forwarded (dropped if the caller leaves)."""
        scope = _scope(confirm_only)
        await self._set(
            {f"{scope}.delay.fixed_delay_percent": percent, f"{scope}.delay.fixed_duration_ms": ms}
        )

    async def throttle_responses(self, percent: int = 100, *, confirm_only: bool = False) -> None:
        """Requests reach localstripe, whose answers then trickle back at 1 KiB/s: the
        provider has acted long before the caller hears of it."""
        await self._set({f"{_scope(confirm_only)}.rate_limit.response_percent": percent})

    async def clear(self) -> None:
        await self._set(
            {
                f"{scope}.{key}": 0
                for scope in ("fault.http", "fault.confirm")
                for key in (
                    "abort.abort_percent",
                    "delay.fixed_delay_percent",
                    "rate_limit.response_percent",
                )
            }
        )

    async def stat(self, name: str) -> int:
        """One Envoy counter of the provider listener, e.g. "downstream_rq_total" (every
        request that arrived) or "fault.aborts_injected"."""
        async with httpx.AsyncClient(base_url=self._admin, timeout=5) as admin:
            reply = await admin.get("/stats", params={"filter": f"^{EGRESS_STATS}{name}$"})
        reply.raise_for_status()
        for line in reply.text.splitlines():
            key, _, value = line.partition(": ")
            if key == EGRESS_STATS + name:
                return int(value)
        raise KeyError(name)

    async def _set(self, values: dict[str, int]) -> None:
        async with httpx.AsyncClient(base_url=self._admin, timeout=5) as admin:
            reply = await admin.post("/runtime_modify", params=values)
        reply.raise_for_status()


class NatsServer:
    """A nats-server with JetStream on a port and store folder of its own, which a test may
    kill (SIGKILL, as a crash) and start again with its store."""

    def __init__(
        self, port: int, store_dir: Path, log_path: Path, cluster_ports: Sequence[int] = ()
    ) -> None:
        self.port = port
        self.store_dir = store_dir
        self._log_path = log_path
        # Every node's client port, when this is one node of a cluster.
        self._cluster_ports = cluster_ports
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return nats_url(self.port)

    def start(self) -> None:
        with self._log_path.open("ab") as log:
            self._process = start_nats(
                self.port, self.store_dir, log=log, cluster_ports=self._cluster_ports
            )
        wait_for_nats(self.port, self._process)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)


@contextlib.contextmanager
def running_nats(scratch: Path | None = None) -> Iterator[NatsServer]:
    """A nats-server on a free port, its store and log in `scratch` (or a folder of its own)."""
    with contextlib.ExitStack() as cleanup:
        if scratch is None:
            scratch = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="nats-")))
        nats = NatsServer(free_port(), scratch / "nats", scratch / "nats.log")
        nats.start()
        cleanup.callback(nats.stop)
        yield nats


@contextlib.contextmanager
def running_nats_cluster(scratch: Path, nodes: int = 3) -> Iterator[list[NatsServer]]:
    """A JetStream cluster of `nodes` nats-servers on loopback, stores and logs in
    `scratch`. Route ports are client ports + ROUTE_PORT_OFFSET, so client ports are
    picked where both are free."""
    ports: list[int] = []
    while len(ports) < nodes:
        port = free_port()
        if port + ROUTE_PORT_OFFSET < 65536 and not port_is_taken(port + ROUTE_PORT_OFFSET):
            ports.append(port)
    servers = [
        NatsServer(port, scratch / f"nats-{port}", scratch / f"nats-{port}.log", ports)
        for port in ports
    ]
    with contextlib.ExitStack() as cleanup:
        for server in servers:
            cleanup.callback(server.stop)
            with server._log_path.open("ab") as log:
                server._process = start_nats(
                    server.port, server.store_dir, log=log, cluster_ports=ports
                )
        for server in servers:
            assert server._process is not None
            wait_for_nats(server.port, server._process)
        yield servers


class LocalStripe:
    """localstripe's own API on its own port (not through Envoy)."""

    def __init__(self, port: int) -> None:
        self._base = f"http://127.0.0.1:{port}"

    async def payment_method(self, card_number: str) -> str:
        card = {"number": card_number, "exp_month": "12", "exp_year": "2030", "cvc": "123"}
        form = {"type": "card", **{f"card[{key}]": value for key, value in card.items()}}
        async with self._client() as client:
            reply = await client.post("/v1/payment_methods", data=form)
        reply.raise_for_status()
        payment_method_id: str = reply.json()["id"]
        return payment_method_id

    async def list_payment_intents(self) -> list[dict[str, Any]]:
        return await self._list("/v1/payment_intents")

    async def intents_for_order(self, order_id: str) -> list[dict[str, Any]]:
        intents = await self.list_payment_intents()
        return [intent for intent in intents if intent["metadata"].get("order_id") == order_id]

    async def intent(self, intent_id: str) -> dict[str, Any]:
        async with self._client() as client:
            reply = await client.get(f"/v1/payment_intents/{intent_id}")
        reply.raise_for_status()
        intent: dict[str, Any] = reply.json()
        return intent

    async def refunds_for(self, intent_id: str) -> list[dict[str, Any]]:
        return await self._list("/v1/refunds", payment_intent=intent_id)

    async def charges_for(self, intent_id: str) -> list[dict[str, Any]]:
        # localstripe cannot filter charges by intent; an intent only shows its latest one.
        charges = await self._list("/v1/charges")
        return [charge for charge in charges if charge["payment_intent"] == intent_id]

    async def _list(self, path: str, **filters: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        params: dict[str, str | int] = {**filters, "limit": 100}
        async with self._client() as client:
            while True:
                reply = await client.get(path, params=params)
                reply.raise_for_status()
                page = reply.json()
                items.extend(page["data"])
                if not page["has_more"] or not page["data"]:
                    return items
                params["starting_after"] = page["data"][-1]["id"]

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self._base,
            headers={"Authorization": f"Bearer {LOCALSTRIPE_API_KEY}"},
            timeout=10,
        )


def server_env(
    database_url: str,
    grpc_port: int,
    provider_proxy_port: int | None = None,
    nats_port: int | None = None,
) -> dict[str, str]:
    """The server's environment. Without a provider port (tests that make no payments) the
    provider is a port nobody listens on: never the real Stripe; the same for NATS (the
    server serves without it, its events wait in the outbox)."""
    if provider_proxy_port is None:
        provider_proxy_port = free_port()
    if nats_port is None:
        nats_port = free_port()
    return {
        "DATABASE_URL": database_url,
        "MARKETPLACE_JWT_SECRET": JWT_SECRET,
        "GRPC_PORT": str(grpc_port),
        "METRICS_PORT": "0",
        "HEALTH_CHECK_INTERVAL": "0.2",
        "DB_POOL_SIZE": "20",
        "DB_MAX_OVERFLOW": "10",
        "LOG_LEVEL": "WARNING",
        # localstripe, through Envoy's provider listener where tests inject faults
        "STRIPE_API_BASE": f"http://127.0.0.1:{provider_proxy_port}",
        "STRIPE_API_KEY": LOCALSTRIPE_API_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        # short enough that failure drills finish in seconds
        "PROVIDER_TIMEOUT": "1",
        "PROVIDER_MAX_ATTEMPTS": "3",
        "PROVIDER_BREAKER_THRESHOLD": "3",
        "PROVIDER_BREAKER_RESET": "2",
        "BACKGROUND_INTERVAL": "0.2",
        "RECONCILE_AFTER": "1",
        "NATS_URL": nats_url(nats_port),
        # a takeover and a dead letter within seconds
        "OUTBOX_LEADER_RETRY": "0.5",
        "CONSUMER_RETRY_DELAY": "0.1",
        "CONSUMER_ACK_WAIT": "5",
    }


@dataclass(frozen=True)
class Stack:
    """The ports of a running stack. Without a server, its gRPC and REST ports lead nowhere."""

    grpc_port: int
    http_port: int
    admin_port: int
    localstripe_port: int
    provider_proxy_port: int
    log_dir: Path
    server_database_url: str | None
    # With TLS files, the server requires client certificates and Envoy's listener serves TLS.
    tls: TlsFiles | None = None
    # The server's NATS (JetStream); tests may kill and start it again.
    nats: NatsServer | None = field(default=None, compare=False)
    # The SMTP sink the server's emails go to; tests may stop it (SMTP down) and start it.
    mail: MailSink | None = field(default=None, compare=False)

    @property
    def database_url(self) -> str:
        """The server's database."""
        if self.server_database_url is None:
            raise RuntimeError("this stack runs no server, so it has no database")
        return self.server_database_url

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_base(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def api_base(self) -> str:
        """Where the Stripe SDK is pointed: Envoy's egress listener, not localstripe."""
        return f"http://127.0.0.1:{self.provider_proxy_port}"

    @property
    def faults(self) -> FaultInjector:
        """Faults between the server (or any Stripe SDK at `api_base`) and localstripe."""
        return FaultInjector(self.admin_port)

    @property
    def localstripe(self) -> LocalStripe:
        return LocalStripe(self.localstripe_port)


@contextlib.contextmanager
def running_stack(
    database_url: str | None = None, *, tls: TlsFiles | None = None
) -> Iterator[Stack]:
    """localstripe and an Envoy in front of it on free ports, a nats-server with JetStream
    (`Stack.nats`) and, with `database_url`, the server on that database and that NATS,
    with localstripe's webhooks going to it through Envoy. With
    `tls`, the server's port and Envoy's REST listener serve TLS, the server requires client
    certificates, and Envoy presents `tls`'s client certificate to it.

    Envoy always runs the whole envoy.yaml; without a server its REST listener points at a
    gRPC port nobody listens on, which costs nothing.
    """
    grpc_port, http_port, admin_port = free_port(), free_port(), free_port()
    localstripe_port, provider_proxy_port = free_port(), free_port()
    with (
        tempfile.TemporaryDirectory(prefix="marketplace-stack-") as scratch,
        running_nats(Path(scratch)) as nats,
        MailSink.running(Path(scratch)) as mail,
    ):
        log_dir = Path(scratch)
        config = log_dir / "envoy.yaml"
        config.write_text(
            render_envoy_config(
                http_port=http_port,
                grpc_port=grpc_port,
                admin_port=admin_port,
                provider_proxy_port=provider_proxy_port,
                localstripe_port=localstripe_port,
                tls=tls,
                # Every test calls from 127.0.0.1; tests/e2e/test_limits.py runs its own Envoy.
                limits=EdgeLimits.without_rate_limits(),
            )
        )
        with (
            (log_dir / "server.log").open("wb") as server_log,
            (log_dir / "envoy.log").open("wb") as envoy_log,
            (log_dir / "localstripe.log").open("wb") as localstripe_log,
        ):
            localstripe = start_localstripe(localstripe_port, log=localstripe_log)
            server = None
            if database_url is not None:
                env = server_env(database_url, grpc_port, provider_proxy_port, nats.port)
                env["SMTP_URL"] = mail.url
                if tls is not None:
                    env |= tls.server_env()
                server = start_server(env, log=server_log)
            envoy = start_envoy(config, log=envoy_log)
            try:
                wait_for_localstripe(localstripe_port, localstripe)
                if server is not None:
                    webhook_url = f"http://127.0.0.1:{http_port}{WEBHOOK_PATH}"
                    register_localstripe_webhook(localstripe_port, webhook_url, WEBHOOK_SECRET)
                    credentials = tls.channel_credentials() if tls is not None else None
                    wait_for_grpc(grpc_port, server, credentials=credentials)
                wait_for_envoy(admin_port, envoy)
                yield Stack(
                    grpc_port,
                    http_port,
                    admin_port,
                    localstripe_port,
                    provider_proxy_port,
                    log_dir,
                    database_url,
                    tls,
                    nats,
                    mail,
                )
            finally:
                stop_process(envoy)
                exit_code = stop_process(server) if server is not None else 0
                stop_process(localstripe)
        assert exit_code == 0, (log_dir / "server.log").read_text()[-4000:]


def bearer(token: str) -> tuple[tuple[str, str]]:
    """gRPC metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class FleetStack:
    """A running fleet: `stack` as `running_stack` has it (its `grpc_port` is replica 1's),
    the replicas (`fleet`), and Envoy's `spare_ports`: endpoints of its marketplace_grpc
    cluster that no replica serves yet, where `start_spare` starts a new one."""

    stack: Stack
    fleet: Fleet = field(compare=False)
    spare_ports: list[int] = field(compare=False)

    @property
    def envoy_grpc_target(self) -> str:
        """Envoy's listener, which takes native gRPC calls as well as REST."""
        return f"127.0.0.1:{self.stack.http_port}"

    def start_spare(self) -> Replica:
        port = self.spare_ports.pop(0)
        replica = self.fleet.start_replica(grpc_port=port)
        wait_for_grpc(port, replica.process)
        return replica

    async def upstream_stats(self) -> dict[int, dict[str, str]]:
        """Envoy's view of each replica, by port: its counters and health flags."""
        async with httpx.AsyncClient(timeout=5) as admin:
            reply = await admin.get(f"http://127.0.0.1:{self.stack.admin_port}/clusters")
        reply.raise_for_status()
        stats: dict[int, dict[str, str]] = {}
        for line in reply.text.splitlines():
            cluster, _, rest = line.partition("::")
            if cluster != "marketplace_grpc" or not rest.startswith("127.0.0.1:"):
                continue
            address, name, value = rest.split("::", 2)
            stats.setdefault(int(address.rpartition(":")[2]), {})[name] = value
        return stats


@contextlib.contextmanager
def running_fleet(
    database_url: str, *, replicas: int, spares: int = 1, env: dict[str, str] | None = None
) -> Iterator[FleetStack]:
    """As `running_stack`, with `replicas` server replicas (one process each, unless `env`
    says otherwise) behind Envoy, whose cluster also lists `spares` ports nobody serves yet.
    Each replica's log is `server-<n>.log` in `stack.log_dir`; every replica still running
    at the end must exit 0 on SIGTERM."""
    http_port, admin_port = free_port(), free_port()
    localstripe_port, provider_proxy_port = free_port(), free_port()
    with (
        tempfile.TemporaryDirectory(prefix="marketplace-fleet-") as scratch,
        running_nats(Path(scratch)) as nats,
        MailSink.running(Path(scratch)) as mail,
    ):
        log_dir = Path(scratch)
        base = server_env(database_url, 0, provider_proxy_port, nats.port)
        base |= {
            "SMTP_URL": mail.url,
            "SERVER_WORKERS": "1",
            # Several replicas on one database: smaller pools each.
            "DB_POOL_SIZE": "5",
            "DB_MAX_OVERFLOW": "5",
            "SHUTDOWN_DELAY": "1.5",
            **(env or {}),
        }
        fleet = Fleet(
            base,
            grpc_port=0,
            metrics_port=0,
            metrics_dir=log_dir / "metrics",
            log_dir=log_dir,
            free_ports=free_port,
        )
        started = [fleet.start_replica() for _ in range(replicas)]
        spare_ports = free_ports(spares)
        config = log_dir / "envoy.yaml"
        config.write_text(
            render_envoy_config(
                http_port=http_port,
                grpc_port=[replica.grpc_port for replica in started] + spare_ports,
                admin_port=admin_port,
                provider_proxy_port=provider_proxy_port,
                localstripe_port=localstripe_port,
                limits=EdgeLimits.without_rate_limits(),
            )
        )
        exit_codes: dict[int, int] = {}
        with (
            (log_dir / "envoy.log").open("wb") as envoy_log,
            (log_dir / "localstripe.log").open("wb") as localstripe_log,
        ):
            localstripe = start_localstripe(localstripe_port, log=localstripe_log)
            envoy = start_envoy(config, log=envoy_log)
            try:
                wait_for_localstripe(localstripe_port, localstripe)
                webhook_url = f"http://127.0.0.1:{http_port}{WEBHOOK_PATH}"
                register_localstripe_webhook(localstripe_port, webhook_url, WEBHOOK_SECRET)
                for replica in started:
                    wait_for_grpc(replica.grpc_port, replica.process)
                wait_for_envoy(admin_port, envoy)
                stack = Stack(
                    started[0].grpc_port,
                    http_port,
                    admin_port,
                    localstripe_port,
                    provider_proxy_port,
                    log_dir,
                    database_url,
                    None,
                    nats,
                    mail,
                )
                yield FleetStack(stack, fleet, spare_ports)
            finally:
                stop_process(envoy)
                running = {replica.number for replica in fleet.live()}
                exit_codes = {
                    number: code for number, code in fleet.stop().items() if number in running
                }
                stop_process(localstripe)
        failed = {number: code for number, code in exit_codes.items() if code != 0}
        assert not failed, [
            (log_dir / f"server-{number}.log").read_text()[-2000:] for number in failed
        ]


def supervised(supervisor_pid: int, role_env: str) -> list[psutil.Process]:
    """A supervisor's children whose environment has `role_env` (WORKER_ENV, RELAY_ENV)."""
    found = []
    for child in psutil.Process(supervisor_pid).children():
        with contextlib.suppress(psutil.Error):  # gone, or a zombie not reaped yet
            if role_env in child.environ():
                found.append(child)
    return found


def serving_workers(supervisor_pid: int) -> list[psutil.Process]:
    """A supervisor's workers: its children but the outbox relay's own process."""
    return supervised(supervisor_pid, WORKER_ENV)
