"""One interceptor per server: request id, authentication, authorization, error mapping,
metrics and the canonical log line, so servicers contain none of it."""

from __future__ import annotations

import collections
import inspect
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import grpc
import structlog
from google.protobuf.message import DecodeError
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import Counter, Histogram

from server.api.auth import TokenVerifier, single_authorization
from server.api.context import bind_principal
from server.api.errors import (
    InFlightLimit,
    domain_error_status,
    in_flight_limit_status,
    infrastructure_error_status,
    internal_status,
)
from server.domain.errors import DomainError, ErrorReason, FieldViolation, InvalidArgument
from server.domain.identity import Access, Principal, authorize
from server.observability import Metrics
from server.tracing import ORDER_ID, REQUEST_ID, extracted

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_log = structlog.get_logger("marketplace.rpc")

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
_HEALTH_SERVICE = "grpc.health.v1.Health"
_HEALTH_METHODS = f"/{_HEALTH_SERVICE}/"
# The codes that mean the server failed, not the caller (OpenTelemetry's gRPC conventions).
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _parse(payload: Any, deserialize: Callable[[bytes], Any] | None) -> Any:
    if deserialize is None:
        return payload
    try:
        return deserialize(payload)
    except DecodeError:
        raise InvalidArgument(
            [FieldViolation("(request)", "is not a valid protobuf message for this method")]
        ) from None


def peer_address(peer: str) -> str:
    """grpc's peer ("ipv4:10.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path") without its port:
    one client, however many connections it opens."""
    kind, _, rest = peer.partition(":")
    return rest.rpartition(":")[0] if kind in ("ipv4", "ipv6") else peer


class InFlightBudget:
    """How many calls, or long-lived streams (health Watch, reflection), one process serves
    at once: in all, and per peer address. Two budgets, so that streams nobody closes never
    take the places of unary calls (grpc's own maximum_concurrent_rpcs counts both)."""

    def __init__(self, reason: ErrorReason, *, total: int, per_peer: int | None = None) -> None:
        self._reason = reason
        self._total = total
        self._per_peer = per_peer
        self._open = 0
        self._by_peer: collections.Counter[str] = collections.Counter()

    def take(self, peer: str) -> Callable[[], None]:
        """A place for `peer`, or InFlightLimit; returns its release."""
        address = peer_address(peer)
        if self._open >= self._total:
            raise InFlightLimit(self._reason, "this server process", self._total)
        if self._per_peer is not None and self._by_peer[address] >= self._per_peer:
            raise InFlightLimit(self._reason, f"the peer {address}", self._per_peer)
        self._open += 1
        self._by_peer[address] += 1

        def release() -> None:
            self._open -= 1
            self._by_peer[address] -= 1
            if not self._by_peer[address]:
                del self._by_peer[address]

        return release


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        policies: Mapping[str, Access],
        metrics: Metrics,
        calls: InFlightBudget,
        streams: InFlightBudget,
        admit: Callable[[str], None] = lambda method: None,
        tracer: Tracer | None = None,
    ) -> None:
        self._verifier = verifier
        # None with tracing off: calls then make no span at all (server/tracing.py).
        self._tracer = tracer
        self._policies = policies
        self._metrics = metrics
        # Raises, before the call runs, when something the method needs is known to be down.
        self._admit = admit
        self._calls = calls
        self._streams = streams
        # Wrapping is per method, not per call: grpc hands us the same handler each time.
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        # Labelled metric children, looked up once per method and code rather than per call
        # (prometheus_client's labels() takes a lock and validates the label values).
        self._rpc_counts: dict[tuple[str, grpc.StatusCode], Counter] = {}
        self._rpc_latencies: dict[str, Histogram] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        if (wrapped := self._wrapped.get(method)) is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        # Streaming RPCs are only health Watch and reflection, both public by design; what
        # they need is a place in the stream budget.
        if handler.unary_stream is not None or handler.stream_stream is not None:
            make_handler = (
                grpc.unary_stream_rpc_method_handler
                if handler.unary_stream is not None
                else grpc.stream_stream_rpc_method_handler
            )
            wrapped = make_handler(
                self._bounded(handler.unary_stream or handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            self._wrapped[method] = wrapped
            return wrapped
        if handler.unary_unary is None:
            return handler
        behavior = self._wrap(
            cast(UnaryBehavior, handler.unary_unary),
            method=method,
            access=self._policies.get(method, Access.AUTHENTICATED),
            deserialize=handler.request_deserializer,
        )
        # The request is parsed inside `behavior`, so bytes that are not a valid message
        # become INVALID_ARGUMENT instead of grpc's UNKNOWN.
        wrapped = grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=None, response_serializer=handler.response_serializer
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(
        self,
        inner: UnaryBehavior,
        *,
        method: str,
        access: Access,
        deserialize: Callable[[bytes], Any] | None,
    ) -> UnaryBehavior:
        span_name = method.lstrip("/")
        service, _, rpc = span_name.partition("/")
        # Health checks (Envoy's, every second per replica) would bury the orders' traces.
        tracer = None if service == _HEALTH_SERVICE else self._tracer

        async def traced(payload: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            assert tracer is not None
            invocation = context.invocation_metadata() or ()
            with tracer.start_as_current_span(
                span_name,
                context=extracted(
                    {key: value for key, value in invocation if isinstance(value, str)}
                ),
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
                # A failed call ends with context.abort's exception; its status is set below.
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                return await behavior(payload, context, span)

        async def behavior(
            payload: Any, context: grpc.aio.ServicerContext[Any, Any], span: Span | None = None
        ) -> Any:
            invocation = context.invocation_metadata() or ()
            metadata = dict(invocation)
            supplied = metadata.get("x-request-id")
            request_id = (
                supplied
                if isinstance(supplied, str) and _REQUEST_ID.fullmatch(supplied)
                else uuid.uuid4().hex
            )
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(request_id=request_id, method=method)
            started = time.perf_counter()
            failure: grpc.Status | None = None
            request: Any = None
            response: Any = None
            release: Callable[[], None] | None = None
            try:
                release = self._calls.take(context.peer())
                principal = self._authenticate(
                    [value for key, value in invocation if key == "authorization"]
                )
                authorize(access, principal)
                bind_principal(principal)
                if principal is not None:
                    structlog.contextvars.bind_contextvars(caller=principal.subject)
                request = _parse(payload, deserialize)
                self._admit(method)
                response = await inner(request, context)
            except InFlightLimit as refused:
                failure = in_flight_limit_status(refused)
            except DomainError as error:
                # Envoy's transcoder marks the calls it makes from REST requests.
                transcoded = "x-envoy-original-path" in metadata
                failure = domain_error_status(error, json_names=transcoded)
            except Exception as error:  # the one outer boundary: everything else ends here
                failure = infrastructure_error_status(error)
                if failure is None:
                    _log.exception("unhandled error")
                    failure = internal_status(request_id)
                else:
                    _log.warning("dependency failure", error=repr(error))
            finally:
                if release is not None:
                    release()
            code = failure.code if failure is not None else grpc.StatusCode.OK
            if span is not None:
                _annotate(span, request_id, code, request, response)
            self._record(method, code, started, failure)
            trailer = (("x-request-id", request_id),)
            if failure is not None:
                await context.abort(
                    failure.code, failure.details, (*failure.trailing_metadata, *trailer)
                )
            context.set_trailing_metadata(trailer)
            return response

        return behavior if tracer is None else traced

    def _bounded(self, inner: Any, method: str) -> Any:
        """`inner` (a coroutine writing to its context, or an async generator) run only with
        a place in the stream budget, released when the stream ends however it ends."""

        async def take_place(context: grpc.aio.ServicerContext[Any, Any]) -> Callable[[], None]:
            try:
                return self._streams.take(context.peer())
            except InFlightLimit as refused:
                failure = in_flight_limit_status(refused)
                self._record(method, failure.code, time.perf_counter(), failure)
                await context.abort(failure.code, failure.details, failure.trailing_metadata)

        if inspect.isasyncgenfunction(inner):

            async def generator(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                release = await take_place(context)
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    release()

            return generator

        async def coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            release = await take_place(context)
            try:
                return await inner(request, context)
            finally:
                release()

        return coroutine

    def _authenticate(self, entries: Sequence[str | bytes]) -> Principal | None:
        header = single_authorization(entries)
        return None if header is None else self._verifier.verify(header)

    def _record(
        self,
        method: str,
        code: grpc.StatusCode,
        started: float,
        failure: grpc.Status | None,
    ) -> None:
        elapsed = time.perf_counter() - started
        count = self._rpc_counts.get((method, code))
        if count is None:
            count = self._rpc_counts[method, code] = self._metrics.rpc_total.labels(
                method, code.name
            )
        count.inc()
        latency = self._rpc_latencies.get(method)
        if latency is None:
            latency = self._rpc_latencies[method] = self._metrics.rpc_seconds.labels(method)
        latency.observe(elapsed)
        # Health checks that pass come every second from each gateway and probe: at INFO
        # they would drown the calls people read the log for.
        routine = code is grpc.StatusCode.OK and method.startswith(_HEALTH_METHODS)
        (_log.debug if routine else _log.info)(
            "rpc",
            code=code.name,
            duration_ms=round(elapsed * 1000, 2),
            **({"error": failure.details} if failure is not None else {}),
        )


def _annotate(
    span: Span, request_id: str, code: grpc.StatusCode, request: Any, response: Any
) -> None:
    span.set_attribute(REQUEST_ID, request_id)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, code.name))
    if order_id := _order_id(request, response):
        span.set_attribute(ORDER_ID, order_id)


def _order_id(request: Any, response: Any) -> str | None:
    """The order a call is about, for finding its trace: a request naming it (payments) or
    an answer carrying it (an order, a payment)."""
    for message, field in ((response, "order"), (response, "payment")):
        found = getattr(message, field, None)
        if found is not None and message.HasField(field):
            return str(getattr(found, "order_id", "") or getattr(found, "id", "")) or None
    return str(getattr(request, "order_id", "")) or None
