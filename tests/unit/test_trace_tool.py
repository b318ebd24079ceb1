"""The trace tool (server/tools/trace.py) on spans written the way the server writes them:
the SDK's exporter with server/tracing.py's one-line format, from a provider of the test's
own (never the global one)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from server.settings import Settings
from server.tools import trace as trace_tool
from server.tracing import (
    ORDER_ID,
    TRACEPARENT,
    current_traceparent,
    extracted,
    inject,
    install_tracing,
    json_line,
    log_processors,
    tracer_of,
)
from tests.conftest import JWT_SECRET

ORDER = "6a1d3c6e-8a6e-4f8e-9a55-0c1f6f3e2b10"
OTHER_ORDER = "0f2b7f0c-1111-4c3c-9d6e-1f2e3d4c5b6a"


def _write_spans() -> str:
    """An order's call with a statement in it, the relay's publish of its event continuing
    the call's trace from a stored traceparent, a consumer's delivery under the publish, and
    another order's call: as JSON lines."""
    out = io.StringIO()
    provider = TracerProvider(resource=Resource.create({"service.name": "marketplace"}))
    provider.add_span_processor(
        SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=json_line))
    )
    tracer = provider.get_tracer("test")
    stored: dict[str, str] = {}
    with tracer.start_as_current_span(
        "marketplace.payment.v1.PaymentService/CreatePayment",
        kind=SpanKind.SERVER,
        attributes={ORDER_ID: ORDER, "marketplace.request_id": "pay-1"},
    ):
        with tracer.start_as_current_span(
            "UPDATE", kind=SpanKind.CLIENT, attributes={"db.statement": "UPDATE orders  SET x"}
        ):
            pass
        with tracer.start_as_current_span("stripe confirm", kind=SpanKind.CLIENT):
            pass
        inject(stored)
    publish = tracer.start_span(
        "marketplace.order.paid publish",
        context=extracted({TRACEPARENT: stored[TRACEPARENT]}),
        kind=SpanKind.PRODUCER,
        attributes={ORDER_ID: ORDER},
    )
    headers: dict[str, str] = {}
    inject(headers, trace.set_span_in_context(publish))
    publish.end()
    with tracer.start_as_current_span(
        "notifications process", context=extracted(headers), kind=SpanKind.CONSUMER
    ):
        pass
    with tracer.start_as_current_span(
        "marketplace.order.v1.OrderService/CreateOrder",
        kind=SpanKind.SERVER,
        attributes={ORDER_ID: OTHER_ORDER},
    ):
        pass
    provider.shutdown()
    return out.getvalue()


def test_an_orders_trace_prints_as_one_tree_with_the_relay_and_consumer_under_the_call() -> None:
    spans = trace_tool.load_spans(_write_spans().splitlines())
    [trace_id] = trace_tool.traces_of_order(spans, ORDER)

    lines = trace_tool.render_order(spans, ORDER)

    assert lines[0].startswith(f"trace {trace_id}  5 spans")
    depth = {
        name: next(len(line) - len(line.lstrip()) for line in lines[1:] if name in line)
        for name in (
            "CreatePayment",
            "UPDATE",
            "stripe confirm",
            "order.paid publish",
            "notifications process",
        )
    }
    assert depth["UPDATE"] == depth["stripe confirm"] == depth["CreatePayment"] + 2
    assert depth["order.paid publish"] == depth["CreatePayment"] + 2
    assert depth["notifications process"] == depth["order.paid publish"] + 2
    assert "db.statement=UPDATE orders SET x" in next(line for line in lines if "UPDATE" in line)
    assert all(" ms " in line for line in lines[1:])
    assert not any("CreateOrder" in line for line in lines)


def test_a_span_whose_parent_is_elsewhere_is_a_root_and_a_cut_line_is_skipped() -> None:
    text = _write_spans()
    lines = text.splitlines()
    # The call's span lost (say, Envoy's span, never in the file), and a line cut short.
    without_call = [line for line in lines if "CreatePayment" not in line]
    spans = trace_tool.load_spans([*without_call, lines[0][:40]])

    rendered = trace_tool.render_order(spans, ORDER)

    roots = [line for line in rendered[1:] if line.startswith("  +")]
    assert any("UPDATE" in line for line in roots)
    assert any("order.paid publish" in line for line in roots)
    assert len(rendered) == 1 + 4


def test_the_command_prints_the_tree_or_says_there_is_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spans_file = tmp_path / "traces.jsonl"
    spans_file.write_text(_write_spans())

    assert trace_tool.main([ORDER, "--file", str(spans_file)]) == 0
    assert "notifications process" in capsys.readouterr().out

    assert trace_tool.main(["no-such-order", "--file", str(spans_file)]) == 1
    assert "no span of order no-such-order" in capsys.readouterr().err

    assert trace_tool.main([ORDER, "--file", str(tmp_path / "missing.jsonl")]) == 2


def test_with_nowhere_to_send_spans_nothing_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRACE_FILE", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    env: dict[str, Any] = {
        "DATABASE_URL": "postgresql://unused/db",
        "MARKETPLACE_JWT_SECRET": JWT_SECRET,
        "STRIPE_WEBHOOK_SECRET": "whsec_tracing_unit_test",
    }
    settings = Settings(**env)

    assert install_tracing(settings) is None

    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert not hasattr(psycopg.AsyncConnection.connect, "__wrapped__")
    assert tracer_of(None) is None
    assert current_traceparent() is None
    assert log_processors(None) == []
