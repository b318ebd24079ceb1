"""Tracing the whole way (docs/architecture.md, "Tracing"): a server process with TRACE_FILE
behind Envoy, on a real nats-server, localstripe and SMTP sink. An order placed through
Envoy's REST route with a caller's `traceparent` stays in the caller's trace; its payment's
trace holds the call, its PostgreSQL statements, the Stripe requests, the relay's publishes
(from the outbox row's stored context) and the notifications consumer's deliveries; the
trace tool prints it; the call's log line carries its trace id and Envoy's request id. With
tracing off (the shared stack's server) no row carries a trace context."""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from devstack.postgres import create_database, drop_database
from devstack.processes import stop_process
from devstack.server import start_server, wait_for_grpc
from marketplace.order.v1 import order_pb2
from marketplace.payment.v1 import payment_pb2, payment_pb2_grpc
from marketplace_client import MarketplaceClient
from server.api.auth import issue_development_token
from server.tools import trace as trace_tool
from tests.conftest import JWT_SECRET, Tokens, eventually
from tests.e2e.payment_checks import query
from tests.stack import Stack, bearer, running_stack, server_env

pytestmark = pytest.mark.e2e

SUCCESS_CARD = "4242424242424242"


@dataclass(frozen=True)
class TracedServer:
    stack: Stack
    database_url: str
    trace_file: Path
    server_log: Path


@pytest.fixture(scope="module")
def traced(
    postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TracedServer]:
    """Its own database and NATS: another server's relay, untraced, must not publish these
    events (it would drop their trace context)."""
    database_url = create_database(postgres_server_url, "marketplace_tracing")
    trace_file = tmp_path_factory.mktemp("tracing") / "traces.jsonl"
    try:
        with running_stack() as stack:
            assert stack.nats is not None
            assert stack.mail is not None
            env = server_env(
                database_url, stack.grpc_port, stack.provider_proxy_port, stack.nats.port
            ) | {
                "SMTP_URL": stack.mail.url,
                "TRACE_FILE": str(trace_file),
                "LOG_LEVEL": "INFO",
                "LOG_FORMAT": "json",
                # The SDK's batch exporter writes every 0.2 s instead of every 5 s.
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            }
            server_log = stack.log_dir / "traced-server.log"
            with server_log.open("wb") as log:
                server = start_server(env, log=log)
            try:
                wait_for_grpc(stack.grpc_port, server)
                yield TracedServer(stack, database_url, trace_file, server_log)
            finally:
                exit_code = stop_process(server)
            assert exit_code == 0, server_log.read_text()[-4000:]
    finally:
        drop_database(postgres_server_url, database_url)


@pytest.fixture
async def traced_channel(traced: TracedServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(traced.stack.grpc_target) as channel:
        yield channel


def _customer() -> str:
    return issue_development_token(
        JWT_SECRET,
        f"trace-{uuid.uuid4().hex[:8]}",
        ["customer"],
        lifetime_seconds=3600,
        email="trace@example.com",
    )


async def _order_through_envoy(
    traced: TracedServer, token: str, product_id: str, traceparent: str
) -> tuple[order_pb2.Order, str]:
    """CreateOrder by Envoy's REST route with the caller's `traceparent`; the order and
    the request id Envoy gave the call."""
    async with httpx.AsyncClient(base_url=traced.stack.rest_base, timeout=30) as rest:
        response = await rest.post(
            "/v1/orders",
            json={
                "requestId": str(uuid.uuid4()),
                "items": [{"productId": product_id, "quantity": 1}],
            },
            headers={"authorization": f"Bearer {token}", "traceparent": traceparent},
        )
    assert response.status_code == 200, response.text
    order = order_pb2.Order(id=response.json()["order"]["id"])
    return order, response.headers["x-request-id"]


def _spans(traced: TracedServer) -> list[trace_tool.Span]:
    if not traced.trace_file.exists():
        return []
    with traced.trace_file.open(encoding="utf-8") as lines:
        return trace_tool.load_spans(lines)


async def test_an_orders_payment_is_one_trace_from_the_call_to_the_consumer(
    traced: TracedServer, traced_channel: grpc.aio.Channel, tokens: Tokens
) -> None:
    async with MarketplaceClient(traced_channel, token=tokens.admin()) as admin:
        product = await admin.create_product(
            sku=f"TRACE-{uuid.uuid4().hex[:8]}",
            name="Traced mug",
            price="9.50",
            currency="USD",
            stock=10,
        )
    token = _customer()
    caller_trace = secrets.token_hex(16)
    order, request_id = await _order_through_envoy(
        traced, token, product.id, f"00-{caller_trace}-{secrets.token_hex(8)}-01"
    )
    card = await traced.stack.localstripe.payment_method(SUCCESS_CARD)
    payments = payment_pb2_grpc.PaymentServiceStub(traced_channel)
    answer = await payments.CreatePayment(
        payment_pb2.CreatePaymentRequest(
            order_id=order.id, request_id=str(uuid.uuid4()), payment_method=card
        ),
        metadata=bearer(token),
    )
    assert answer.payment.status == payment_pb2.PAYMENT_STATUS_SUCCEEDED

    def payment_trace(spans: list[trace_tool.Span]) -> list[trace_tool.Span]:
        """The payment's trace, once the relay's publish and the notifications consumer's
        delivery are both in it. The publish span ends at JetStream's acknowledgement, which
        can come after the consumer's span has ended and been exported (seen in CI)."""
        for trace_id in trace_tool.traces_of_order(spans, order.id):
            members = [span for span in spans if span.trace_id == trace_id]
            names = {span.name for span in members}
            if (
                any(name.endswith("/CreatePayment") for name in names)
                and "notifications process" in names
                and "marketplace.order.paid publish" in names
            ):
                return members
        return []

    async def traced_through() -> list[trace_tool.Span]:
        return payment_trace(_spans(traced))

    members = await eventually(traced_through, within=30, what="the payment's whole trace")

    kinds = {(span.kind, span.name) for span in members}
    assert ("SERVER", "marketplace.payment.v1.PaymentService/CreatePayment") in kinds
    by_id = {span.span_id: span for span in members}
    statements = [s for s in members if s.attributes.get("db.system") == "postgresql"]
    assert statements, "no PostgreSQL span in the payment's trace"
    assert any(s.name.startswith("stripe ") for s in members), kinds
    # Stripe's HTTP request itself, by httpx's instrumentation, under a stripe span.
    assert any(
        s.kind == "CLIENT"
        and s.parent_id in by_id
        and by_id[s.parent_id].name.startswith("stripe ")
        for s in members
    ), kinds
    publishes = [s for s in members if s.kind == "PRODUCER" and s.name.endswith(" publish")]
    assert {s.name for s in publishes} >= {"marketplace.order.paid publish"}
    deliveries = [s for s in members if s.name == "notifications process"]
    assert all(by_id[d.parent_id].kind == "PRODUCER" for d in deliveries if d.parent_id)
    assert {by_id[d.parent_id].name for d in deliveries if d.parent_id in by_id} >= {
        "marketplace.order.paid publish"
    }

    # The order's own call continued the caller's trace through Envoy, and its group-commit
    # batch, the transaction's statements and the relay's publish of order.created joined it.
    async def order_traced_through() -> list[trace_tool.Span]:
        spans = _spans(traced)
        members = [span for span in spans if span.trace_id == caller_trace]
        names = {span.name for span in members}
        done = {"notifications process", "marketplace.order.created publish"} <= names
        return members if done else []

    in_caller_trace = await eventually(
        order_traced_through, within=30, what="the order's call, batch, publish and delivery"
    )
    by_id = {span.span_id: span for span in in_caller_trace}
    [create] = [s for s in in_caller_trace if s.name.endswith("/CreateOrder")]
    assert create.attributes["marketplace.order_id"] == order.id
    assert create.attributes["marketplace.request_id"] == request_id
    [batch] = [s for s in in_caller_trace if s.name == "place_orders"]
    assert batch.parent_id == create.span_id
    assert any(
        s.attributes.get("db.system") == "postgresql" and s.parent_id == batch.span_id
        for s in in_caller_trace
    )
    [created] = [s for s in in_caller_trace if s.name == "marketplace.order.created publish"]
    assert created.attributes["marketplace.order_id"] == order.id
    assert any(
        s.name == "notifications process" and s.parent_id == created.span_id
        for s in in_caller_trace
    )
    assert by_id[created.parent_id or ""].name == "place_orders"

    spans = _spans(traced)
    printed = "\n".join(trace_tool.render_order(spans, order.id))
    for name in (
        "CreatePayment",
        "CreateOrder",
        "stripe ",
        "order.paid publish",
        "notifications process",
    ):
        assert name in printed

    # The call's log line carries its trace id and Envoy's request id.
    log_lines = [
        json.loads(line)
        for line in traced.server_log.read_text().splitlines()
        if line.startswith("{")
    ]
    [rpc_line] = [
        line
        for line in log_lines
        if line.get("event") == "rpc" and line.get("request_id") == request_id
    ]
    assert rpc_line["trace_id"] == caller_trace
    assert rpc_line["method"] == "/marketplace.order.v1.OrderService/CreateOrder"


async def test_with_tracing_off_no_event_carries_a_trace_context(
    stack: Stack, channel: grpc.aio.Channel, tokens: Tokens, database_url: str
) -> None:
    """The shared stack's server has neither TRACE_FILE nor an OTLP endpoint."""
    assert "TRACE_FILE" not in os.environ
    async with MarketplaceClient(channel, token=tokens.admin()) as admin:
        product = await admin.create_product(
            sku=f"UNTRACED-{uuid.uuid4().hex[:8]}",
            name="Plain mug",
            price="3.00",
            currency="USD",
            stock=5,
        )
    async with MarketplaceClient(channel, token=_customer()) as customer:
        order = await customer.create_order([(product.id, 1)])
    rows = query(
        database_url,
        "SELECT traceparent FROM outbox WHERE aggregate_id IN (%s, %s)",
        order.id,
        product.id,
    )
    assert rows
    assert all(traceparent is None for (traceparent,) in rows)
