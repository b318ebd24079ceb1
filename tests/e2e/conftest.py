"""The real thing: the server as its own process and Envoy in front of it."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from marketplace.catalog.v1 import catalog_pb2_grpc
from marketplace.order.v1 import order_pb2_grpc
from server.devstack import (
    free_port,
    render_envoy_config,
    start_envoy,
    start_server,
    stop_process,
    wait_for_envoy,
    wait_for_grpc,
)
from tests.conftest import JWT_SECRET


@dataclass(frozen=True)
class Stack:
    grpc_port: int
    http_port: int
    admin_port: int
    database_url: str
    log_dir: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def server_env(database_url: str, grpc_port: int) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "MARKETPLACE_JWT_SECRET": JWT_SECRET,
        "GRPC_PORT": str(grpc_port),
        "METRICS_PORT": "0",
        "HEALTH_CHECK_INTERVAL": "0.2",
        "DB_POOL_SIZE": "20",
        "DB_MAX_OVERFLOW": "10",
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture(scope="session")
def stack(database_url: str) -> Iterator[Stack]:
    grpc_port, http_port, admin_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="marketplace-e2e-") as scratch:
        log_dir = Path(scratch)
        config = log_dir / "envoy.yaml"
        config.write_text(
            render_envoy_config(http_port=http_port, grpc_port=grpc_port, admin_port=admin_port)
        )
        with (
            (log_dir / "server.log").open("wb") as server_log,
            (log_dir / "envoy.log").open("wb") as envoy_log,
        ):
            server = start_server(server_env(database_url, grpc_port), log=server_log)
            envoy = start_envoy(config, log=envoy_log)
            try:
                wait_for_grpc(grpc_port, server)
                wait_for_envoy(admin_port, envoy)
                yield Stack(grpc_port, http_port, admin_port, database_url, log_dir)
            finally:
                stop_process(envoy)
                exit_code = stop_process(server)
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
