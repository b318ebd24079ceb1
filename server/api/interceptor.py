"""One interceptor per server: request id, authentication, authorization, error mapping,
metrics and the canonical log line, so servicers contain none of it."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import grpc
import structlog
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram

from server.api.auth import TokenVerifier, single_authorization
from server.api.context import bind_principal
from server.api.errors import domain_error_status, infrastructure_error_status, internal_status
from server.domain.errors import DomainError, FieldViolation, InvalidArgument
from server.domain.identity import Access, Principal, authorize
from server.observability import Metrics

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_log = structlog.get_logger("marketplace.rpc")

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def _parse(payload: Any, deserialize: Callable[[bytes], Any] | None) -> Any:
    if deserialize is None:
        return payload
    try:
        return deserialize(payload)
    except DecodeError:
        raise InvalidArgument(
            [FieldViolation("(request)", "is not a valid protobuf message for this method")]
        ) from None


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        policies: Mapping[str, Access],
        metrics: Metrics,
        admit: Callable[[str], None] = lambda method: None,
    ) -> None:
        self._verifier = verifier
        self._policies = policies
        self._metrics = metrics
        # Raises, before the call runs, when something the method needs is known to be down.
        self._admit = admit
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
        # Streaming RPCs are only health Watch and reflection, both public by design.
        if handler is None or handler.unary_unary is None:
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
        async def behavior(payload: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
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
            response: Any = None
            try:
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
            code = failure.code if failure is not None else grpc.StatusCode.OK
            self._record(method, code, started, failure)
            trailer = (("x-request-id", request_id),)
            if failure is not None:
                await context.abort(
                    failure.code, failure.details, (*failure.trailing_metadata, *trailer)
                )
            context.set_trailing_metadata(trailer)
            return response

        return behavior

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
        _log.info(
            "rpc",
            code=code.name,
            duration_ms=round(elapsed * 1000, 2),
            **({"error": failure.details} if failure is not None else {}),
        )
