"""The one place where errors become gRPC statuses with rich details (AIP-193)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from server.api.health import DatabaseDown
from server.db.transactions import is_retryable_conflict
from server.domain.errors import (
    AlreadyExists,
    DomainError,
    ErrorReason,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from server.events.nats import EventsUnavailable
from server.services.circuit import CircuitOpen
from server.services.providers import (
    InvalidSignature,
    ProviderOutcomeUnknown,
    ProviderUnavailable,
)

# AIP-193 asks for a globally unique domain, a DNS name: example.com is reserved (RFC 2606),
# so no other API's errors can claim it. A bare word such as "marketplace" is not unique.
ERROR_DOMAIN = "marketplace.example.com"
# Details travel in a trailer, and gRPC clients refuse trailers over 8 KiB by default; a
# 100-line order can have hundreds of problems, so the details list the first ones and the
# ErrorInfo says how many there are in all.
MAX_LISTED_VIOLATIONS = 25


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _status(code: int, message: str, *details: object) -> grpc.Status:
    proto = status_pb2.Status(code=code, message=message, details=[_pack(d) for d in details])
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def _error_info(
    reason: ErrorReason, metadata: dict[str, str] | None = None
) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {})


def json_field_path(path: str) -> str:
    """A field path as a REST caller writes it, each name in its proto3 JSON form (protoc's
    default json_name, lowerCamelCase): `items[0].product_id` -> `items[0].productId`."""
    named: list[str] = []
    capitalize = False
    for char in path:
        if char == "_":
            capitalize = True
        else:
            named.append(char.upper() if capitalize else char)
            capitalize = False
    return "".join(named)


def domain_error_status(error: DomainError, *, json_names: bool = False) -> grpc.Status:
    """`json_names` for a call Envoy transcoded from REST: field violations then name fields
    as its caller wrote them (`requestId`), not by their proto names (`request_id`)."""
    if isinstance(error, InvalidArgument):
        if json_names:
            error = InvalidArgument(
                [FieldViolation(json_field_path(v.field), v.description) for v in error.violations]
            )
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations[:MAX_LISTED_VIOLATIONS]
            ]
        )
        info = _error_info(
            ErrorReason.INVALID_ARGUMENT, {"violationCount": str(len(error.violations))}
        )
        return _status(code_pb2.INVALID_ARGUMENT, error.message, info, bad_request)
    if isinstance(error, NotFound):
        resource = error_details_pb2.ResourceInfo(
            resource_type=error.resource_type, resource_name=error.resource_id
        )
        info = _error_info(ErrorReason.NOT_FOUND, {"resourceType": error.resource_type})
        return _status(code_pb2.NOT_FOUND, error.message, info, resource)
    if isinstance(error, AlreadyExists):
        resource = error_details_pb2.ResourceInfo(
            resource_type=error.resource_type, resource_name=error.key
        )
        info = _error_info(ErrorReason.ALREADY_EXISTS, {"key": error.key})
        return _status(code_pb2.ALREADY_EXISTS, error.message, info, resource)
    if isinstance(error, FailedPrecondition):
        info = _error_info(error.reason, dict(error.metadata))
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=v.type, subject=v.subject, description=v.description
                )
                for v in error.violations[:MAX_LISTED_VIOLATIONS]
            ]
        )
        if error.violations:
            return _status(code_pb2.FAILED_PRECONDITION, error.message, info, failure)
        return _status(code_pb2.FAILED_PRECONDITION, error.message, info)
    if isinstance(error, Unauthenticated):
        return _status(code_pb2.UNAUTHENTICATED, error.message, _error_info(error.reason))
    if isinstance(error, PermissionDenied):
        info = _error_info(ErrorReason.MISSING_ROLE, {"requiredRole": error.required_role})
        return _status(code_pb2.PERMISSION_DENIED, error.message, info)
    raise TypeError(f"no status for {type(error).__name__}")


def _retry_after(seconds: float) -> error_details_pb2.RetryInfo:
    whole = int(seconds)
    delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def infrastructure_error_status(error: BaseException) -> grpc.Status | None:
    """Statuses for failures that are not the caller's fault but are retryable, and for
    what dependencies say of a caller (a webhook whose signature does not verify)."""
    retry = _retry_after(0.2)
    if isinstance(error, InvalidSignature):
        return _status(
            code_pb2.UNAUTHENTICATED,
            f"webhook rejected: {error}",
            _error_info(ErrorReason.INVALID_SIGNATURE),
        )
    if isinstance(error, ProviderUnavailable | ProviderOutcomeUnknown):
        # Nothing the caller did; what was recorded stays, and a retry with the same
        # request_id resumes where this one stopped.
        seconds = error.retry_after_seconds if isinstance(error, CircuitOpen) else 1.0
        return _status(
            code_pb2.UNAVAILABLE,
            "the payment provider is unavailable; retry with the same request_id",
            _error_info(
                ErrorReason.PAYMENT_PROVIDER_UNAVAILABLE,
                {"circuit": "open" if isinstance(error, CircuitOpen) else "closed"},
            ),
            _retry_after(max(seconds, 0.1)),
        )
    if isinstance(error, DatabaseDown):
        return _status(
            code_pb2.UNAVAILABLE,
            "the database is unavailable; retry shortly",
            _error_info(ErrorReason.DATABASE_UNAVAILABLE),
            _retry_after(error.retry_after_seconds),
        )
    if isinstance(error, EventsUnavailable):
        return _status(
            code_pb2.UNAVAILABLE,
            "the event streams (NATS) are unavailable; retry shortly",
            _error_info(ErrorReason.EVENTS_UNAVAILABLE),
            _retry_after(1.0),
        )
    if is_retryable_conflict(error):
        return _status(
            code_pb2.ABORTED,
            "the transaction kept conflicting with concurrent ones; retry",
            _error_info(ErrorReason.TRANSACTION_CONFLICT),
            retry,
        )
    if isinstance(error, OperationalError | InterfaceError | PoolTimeoutError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    ):
        return _status(
            code_pb2.UNAVAILABLE,
            "the database is unavailable; retry shortly",
            _error_info(ErrorReason.DATABASE_UNAVAILABLE),
            retry,
        )
    return None


class InFlightLimit(Exception):
    """A call or stream refused: `scope` (a peer, or the process) already has `limit` open."""

    def __init__(self, reason: ErrorReason, scope: str, limit: int) -> None:
        super().__init__(f"{scope} already has {limit} open")
        self.reason = reason
        self.scope = scope
        self.limit = limit


def in_flight_limit_status(error: InFlightLimit) -> grpc.Status:
    what = "streams" if error.reason == ErrorReason.TOO_MANY_STREAMS else "calls"
    return _status(
        code_pb2.RESOURCE_EXHAUSTED,
        f"too many {what} in flight: {error.scope} already has {error.limit}; retry later",
        _error_info(error.reason, {"limit": str(error.limit)}),
        _retry_after(1.0),
    )


def internal_status(request_id: str) -> grpc.Status:
    info = _error_info(ErrorReason.INTERNAL, {"requestId": request_id})
    return _status(code_pb2.INTERNAL, f"internal error (request id {request_id})", info)
