"""Typed exceptions carrying the rich error details of AIP-193."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest)."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class PreconditionViolation:
    """One unmet precondition (google.rpc.PreconditionFailure)."""

    type: str
    subject: str
    description: str


class MarketplaceError(Exception):
    """A call failed; `code` is the gRPC status, the rest its decoded details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: Sequence[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        precondition_violations: Sequence[PreconditionViolation] = (),
        retry_delay: timedelta | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = tuple(field_violations)
        self.reason = reason
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.precondition_violations = tuple(precondition_violations)
        self.retry_delay = retry_delay


class InvalidArgumentError(MarketplaceError):
    """The request is malformed; `field_violations` says where."""


class NotFoundError(MarketplaceError):
    """The resource does not exist, or is not the caller's to see."""


class AlreadyExistsError(MarketplaceError):
    """A unique key (such as a product's SKU) is taken."""


class FailedPreconditionError(MarketplaceError):
    """The request is valid but the system's state does not allow it."""


class OutOfStockError(FailedPreconditionError):
    """Not enough stock: one precondition violation per short order line."""


class RequestIdReusedError(FailedPreconditionError):
    """The request_id was already used for a different request."""


class StockManagedByWarehouseError(FailedPreconditionError):
    """adjust_stock on a product whose stock the warehouse counts (inventory_source
    INVENTORY_SOURCE_WAREHOUSE): its levels, not this call, move it."""


class UnauthenticatedError(MarketplaceError):
    """The token is missing, expired or invalid."""


class PermissionDeniedError(MarketplaceError):
    """The token lacks the role the call needs."""


class UnavailableError(MarketplaceError):
    """The service or its database is unavailable; retryable."""


class AbortedError(MarketplaceError):
    """A transaction lost a race with a concurrent one; retryable."""


_BY_CODE: dict[grpc.StatusCode, type[MarketplaceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.ABORTED: AbortedError,
}
_BY_REASON: dict[str, type[MarketplaceError]] = {
    "OUT_OF_STOCK": OutOfStockError,
    "REQUEST_ID_REUSED": RequestIdReusedError,
    "STOCK_MANAGED_BY_WAREHOUSE": StockManagedByWarehouseError,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> MarketplaceError:
    """The typed exception for a failed call, with its rich details decoded."""
    code = error.code()
    status = _rich_status(error.trailing_metadata())
    message = status.message if status is not None else (error.details() or "")
    field_violations: list[FieldViolation] = []
    precondition_violations: list[PreconditionViolation] = []
    reason: str | None = None
    metadata: dict[str, str] = {}
    retry_delay: timedelta | None = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            field_violations += [
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            ]
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            precondition_violations += [
                PreconditionViolation(v.type, v.subject, v.description) for v in failure.violations
            ]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta()
    error_type = _BY_CODE.get(code, MarketplaceError)
    if code == grpc.StatusCode.FAILED_PRECONDITION and reason in _BY_REASON:
        error_type = _BY_REASON[reason]
    return error_type(
        code,
        message,
        field_violations=field_violations,
        reason=reason,
        metadata=metadata,
        precondition_violations=precondition_violations,
        retry_delay=retry_delay,
    )


def _rich_status(trailing_metadata: grpc.aio.Metadata | None) -> status_pb2.Status | None:
    # Decoded by hand rather than with grpc_status.rpc_status.from_call, which raises
    # ValueError when a proxy rewrote the message; a failed call must still map cleanly.
    for key, value in trailing_metadata or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None
