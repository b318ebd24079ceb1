"""The real thing: the server as its own process, Envoy in front of it, and localstripe (a
Stripe emulator) behind Envoy's fault-injecting provider listener."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from devstack.envoy import render_envoy_config, start_envoy, wait_for_envoy
from devstack.localstripe import (
    LOCALSTRIPE_API_KEY,
    WEBHOOK_PATH,
    register_localstripe_webhook,
    start_localstripe,
    wait_for_localstripe,
)
from devstack.postgres import create_database, drop_database
from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from marketplace.catalog.v1 import catalog_pb2_grpc
from marketplace.order.v1 import order_pb2_grpc
from tests.conftest import JWT_SECRET
from tests.payment_stack import FaultInjector, LocalStripe

WEBHOOK_SECRET = "whsec_e2e_" + "x" * 24


@dataclass(frozen=True)
class Stack:
    grpc_port: int
    http_port: int
    admin_port: int
    database_url: str
    log_dir: Path
    localstripe_port: int
    provider_proxy_port: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def faults(self) -> FaultInjector:
        """Faults between the server and localstripe."""
        return FaultInjector(self.admin_port)

    @property
    def localstripe(self) -> LocalStripe:
        return LocalStripe(self.localstripe_port)


def server_env(
    database_url: str, grpc_port: int, provider_proxy_port: int | None = None
) -> dict[str, str]:
    """The server's environment. Without a provider port (tests that make no payments) the
    provider is a port nobody listens on: never the real Stripe."""
    if provider_proxy_port is None:
        provider_proxy_port = free_port()
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
    }


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """The end-to-end servers' own database. Their background passes (expiry, reconciliation)
    sweep every row they can see, so they must not see the integration tests' rows."""
    url = create_database(postgres_server_url, "marketplace_e2e")
    yield url
    drop_database(postgres_server_url, url)


@pytest.fixture(scope="session")
def stack(database_url: str) -> Iterator[Stack]:
    grpc_port, http_port, admin_port = free_port(), free_port(), free_port()
    localstripe_port, provider_proxy_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="marketplace-e2e-") as scratch:
        log_dir = Path(scratch)
        config = log_dir / "envoy.yaml"
        config.write_text(
            render_envoy_config(
                http_port=http_port,
                grpc_port=grpc_port,
                admin_port=admin_port,
                provider_proxy_port=provider_proxy_port,
                localstripe_port=localstripe_port,
            )
        )
        with (
            (log_dir / "server.log").open("wb") as server_log,
            (log_dir / "envoy.log").open("wb") as envoy_log,
            (log_dir / "localstripe.log").open("wb") as localstripe_log,
        ):
            localstripe = start_localstripe(localstripe_port, log=localstripe_log)
            server = start_server(
                server_env(database_url, grpc_port, provider_proxy_port), log=server_log
            )
            envoy = start_envoy(config, log=envoy_log)
            try:
                wait_for_localstripe(localstripe_port, localstripe)
                register_localstripe_webhook(
                    localstripe_port, f"http://127.0.0.1:{http_port}{WEBHOOK_PATH}", WEBHOOK_SECRET
                )
                wait_for_grpc(grpc_port, server)
                wait_for_envoy(admin_port, envoy)
                yield Stack(
                    grpc_port,
                    http_port,
                    admin_port,
                    database_url,
                    log_dir,
                    localstripe_port,
                    provider_proxy_port,
                )
            finally:
                stop_process(envoy)
                exit_code = stop_process(server)
                stop_process(localstripe)
        assert exit_code == 0, (log_dir / "server.log").read_text()[-4000:]


@pytest.fixture(scope="session")
async def channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="session")
def catalog_stub(channel: grpc.aio.Channel) -> catalog_pb2_grpc.CatalogServiceStub:
    return catalog_pb2_grpc.CatalogServiceStub(channel)


@pytest.fixture(scope="session")
def order_stub(channel: grpc.aio.Channel) -> order_pb2_grpc.OrderServiceStub:
    return order_pb2_grpc.OrderServiceStub(channel)


@pytest.fixture(scope="session")
async def rest(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.rest_base, timeout=30) as client:
        yield client


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)
