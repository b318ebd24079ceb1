"""The real thing: the server as its own process, Envoy in front of it, and localstripe (a
Stripe emulator) behind Envoy's fault-injecting provider listener (tests/stack.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest

from devstack.postgres import create_database, drop_database
from marketplace.catalog.v1 import catalog_pb2_grpc
from marketplace.order.v1 import order_pb2_grpc
from tests.stack import Stack, running_stack

# The shared checks' asserts show their operands on failure, like a test's own.
pytest.register_assert_rewrite(
    "tests.e2e.refusals", "tests.e2e.statuses", "tests.e2e.payment_checks"
)


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """The end-to-end servers' own database. Their background passes (expiry, reconciliation)
    sweep every row they can see, so they must not see the integration tests' rows."""
    url = create_database(postgres_server_url, "marketplace_e2e")
    yield url
    drop_database(postgres_server_url, url)


@pytest.fixture
def own_database(postgres_server_url: str) -> Iterator[str]:
    """A database of the test's own: no other server's relay leads on it, and its outbox
    holds only the test's events."""
    url = create_database(postgres_server_url, "marketplace_own")
    yield url
    drop_database(postgres_server_url, url)


@pytest.fixture(scope="session")
def stack(database_url: str) -> Iterator[Stack]:
    with running_stack(database_url) as running:
        yield running


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
