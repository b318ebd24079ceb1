"""OpenTelemetry tracing, installed once per process at startup when it has somewhere to go.

One order's trace runs from the caller (an incoming W3C `traceparent`, Envoy's or a
client's) through the gRPC call (server/api/interceptor.py), its PostgreSQL statements and
Stripe requests (the libraries' own instrumentations), into the outbox row its events are
written with (column `traceparent`), out through the relay's publish (a NATS header) and
into every consumer's handling of it.

With neither OTEL_EXPORTER_OTLP_ENDPOINT nor TRACE_FILE set nothing is installed: the
interceptor, relay and consumers are given no tracer and make no span, and the API's
current span is the invalid one, so no row carries a `traceparent`.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from server.settings import Settings

# The attribute the trace tool (server/tools/trace.py) finds an order's spans by.
ORDER_ID = "marketplace.order_id"
REQUEST_ID = "marketplace.request_id"
TRACEPARENT = "traceparent"

_INSTRUMENTATION = "marketplace"
Item = TypeVar("Item")
Result = TypeVar("Result")
Answer = TypeVar("Answer")
# W3C Trace Context only: Envoy and our own rows carry `traceparent`, nothing else.
_propagator = TraceContextTextMapPropagator()


class _NoOrphanClients(Sampler):
    """For spans without a parent: a database statement or HTTP request outside any traced
    work (the relay's polls, the upkeep passes, the product cache's listener) is dropped,
    rather than each becoming a trace of one span that buries the orders' traces."""

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if kind == SpanKind.CLIENT:
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "NoOrphanClients"


def json_line(span: ReadableSpan) -> str:
    """One span as one line of TRACE_FILE: the SDK's JSON, compact."""
    return str(span.to_json(indent=None)) + "\n"


def _span_file(path: Path) -> IO[str]:
    """Appended to by every worker process: O_APPEND, and one write() per span (the SDK's
    exporter flushes after each, and a span's line is far below the buffer's size), so lines
    never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8", buffering=1 << 16)


def _exporter(settings: Settings) -> tuple[SpanExporter, IO[str] | None]:
    if settings.otel_exporter_otlp_endpoint:
        # Imported only when used: the gRPC exporter pulls in its protobuf modules.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.otel_exporter_otlp_endpoint), None
    assert settings.trace_file is not None
    out = _span_file(settings.trace_file)
    return ConsoleSpanExporter(out=out, formatter=json_line), out


def install_tracing(settings: Settings) -> TracerProvider | None:
    """The process's tracer provider, installed globally with the psycopg and httpx
    instrumentations; None (and nothing installed) when tracing has nowhere to go. Shut it
    down on exit, which exports what is still buffered."""
    if not settings.otel_exporter_otlp_endpoint and settings.trace_file is None:
        return None
    exporter, out = _exporter(settings)
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": settings.otel_service_name, "process.pid": os.getpid()}
        ),
        sampler=ParentBased(root=_NoOrphanClients()),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    PsycopgInstrumentor().instrument(tracer_provider=provider)
    # Stripe's SDK sends its requests through httpx (server/adapters/stripe_provider.py).
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    if out is not None:
        # Closed after the provider's shutdown has exported the last spans into it.
        atexit.register(out.close)
    return provider


def tracer_of(provider: TracerProvider | None) -> Tracer | None:
    return None if provider is None else provider.get_tracer(_INSTRUMENTATION)


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the current span, None outside a sampled one (always with
    tracing off): what an outbox row keeps for the relay to continue its trace."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid or not span_context.trace_flags.sampled:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


def extracted(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context a `traceparent` in `carrier` (gRPC metadata, NATS headers) continues;
    an empty one without it."""
    return _propagator.extract(carrier)


def inject(carrier: MutableMapping[str, str], context: otel_context.Context | None = None) -> None:
    """Adds the `traceparent` of `context`'s span (the current one's by default) to
    `carrier` (NATS headers)."""
    _propagator.inject(carrier, context)


def add_trace_ids(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the current span's trace and span ids on every log line made
    inside one (a call, a relay publish, a consumer's delivery)."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(span_context.span_id, "016x"))
    return event_dict


def log_processors(provider: TracerProvider | None) -> list[structlog.types.Processor]:
    """What configure_logging adds for tracing: nothing when it is off."""
    return [] if provider is None else [add_trace_ids]


class GroupCommitTracing(Generic[Item]):
    """Carries callers' trace contexts into a group-commit runner (server/services/batching.py),
    whose task is not theirs: each batch runs in a span that is a child of its first
    caller's span and links the others, so its statements, and the events it writes, are in
    the first caller's trace (the only one, below full load). Callers are told apart by
    their item's identity, which lives until their submit returns."""

    def __init__(self, tracer: Tracer, name: str) -> None:
        self._tracer = tracer
        self._name = name
        self._callers: dict[int, SpanContext] = {}

    def submit(
        self, submit: Callable[[Item], Awaitable[Answer]]
    ) -> Callable[[Item], Awaitable[Answer]]:
        async def traced(item: Item) -> Answer:
            key = id(item)
            self._callers[key] = trace.get_current_span().get_span_context()
            try:
                return await submit(item)
            finally:
                self._callers.pop(key, None)

        return traced

    def handler(
        self, handler: Callable[[Sequence[Item]], Awaitable[Result]]
    ) -> Callable[[Sequence[Item]], Awaitable[Result]]:
        async def traced(batch: Sequence[Item]) -> Result:
            callers = [
                caller
                for item in batch
                if (caller := self._callers.get(id(item))) is not None and caller.is_valid
            ]
            parent = trace.set_span_in_context(NonRecordingSpan(callers[0])) if callers else None
            with self._tracer.start_as_current_span(
                self._name,
                context=parent,
                links=[Link(caller) for caller in callers[1:]],
                attributes={"marketplace.batch_size": len(batch)},
            ):
                return await handler(batch)

        return traced
