"""Domain errors. The API layer maps each kind to one gRPC status, in one place."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class ErrorReason(enum.StrEnum):
    """Every `google.rpc.ErrorInfo.reason` the API sends (AIP-193): the catalogue clients
    may branch on. Values are part of the contract: add, never rename."""

    # INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS: the details say which field or resource.
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    # FAILED_PRECONDITION: the request is well formed, the system's state refuses it.
    OUT_OF_STOCK = "OUT_OF_STOCK"  # an order line wants more than is left
    INSUFFICIENT_STOCK = "INSUFFICIENT_STOCK"  # a stock adjustment would go below zero
    # AdjustStock on a product whose stock the warehouse counts (inventory_source WAREHOUSE)
    STOCK_MANAGED_BY_WAREHOUSE = "STOCK_MANAGED_BY_WAREHOUSE"
    MIXED_CURRENCIES = "MIXED_CURRENCIES"  # an order's products are priced in several
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"  # the request_id named a different request
    ORDER_NOT_CANCELLABLE = "ORDER_NOT_CANCELLABLE"
    INVALID_ORDER_TRANSITION = "INVALID_ORDER_TRANSITION"
    ORDER_NOT_PAYABLE = "ORDER_NOT_PAYABLE"  # not pending, or its payment window closed
    PAYMENT_IN_PROGRESS = "PAYMENT_IN_PROGRESS"
    PAYMENT_NOT_REFUNDABLE = "PAYMENT_NOT_REFUNDABLE"
    AMOUNT_NOT_CHARGEABLE = "AMOUNT_NOT_CHARGEABLE"  # finer than the currency's minor unit
    REFUND_EXCEEDS_PAYMENT = "REFUND_EXCEEDS_PAYMENT"
    REFUND_IN_PROGRESS = "REFUND_IN_PROGRESS"
    REFUND_REJECTED = "REFUND_REJECTED"  # the payment provider refused the refund
    # The provider has no record of a payment we hold (metadata: paymentId, providerReference);
    # an admin's way out is RefundPayment with outside_provider (docs/operations.md).
    PAYMENT_UNKNOWN_TO_PROVIDER = "PAYMENT_UNKNOWN_TO_PROVIDER"
    # RefundPayment with outside_provider for a payment the provider does know: refund there.
    PAYMENT_KNOWN_TO_PROVIDER = "PAYMENT_KNOWN_TO_PROVIDER"
    # ReplayDeadLetter: the consumer failed on the dead letter again (its error is in the
    # message; the dead letter stays), or this server does not run the dead letter's consumer.
    DEAD_LETTER_STILL_FAILS = "DEAD_LETTER_STILL_FAILS"
    CONSUMER_NOT_RUNNING = "CONSUMER_NOT_RUNNING"
    # UNAUTHENTICATED and PERMISSION_DENIED (names of token problems, not secrets: S105)
    MISSING_TOKEN = "MISSING_TOKEN"  # noqa: S105
    INVALID_TOKEN = "INVALID_TOKEN"  # noqa: S105
    TOKEN_EXPIRED = "TOKEN_EXPIRED"  # noqa: S105
    UNKNOWN_KEY = "UNKNOWN_KEY"
    INVALID_SIGNATURE = "INVALID_SIGNATURE"  # a provider webhook that does not verify
    MISSING_ROLE = "MISSING_ROLE"
    # UNAVAILABLE, ABORTED, INTERNAL: not the caller's doing; the first two are retryable.
    PAYMENT_PROVIDER_UNAVAILABLE = "PAYMENT_PROVIDER_UNAVAILABLE"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    EVENTS_UNAVAILABLE = "EVENTS_UNAVAILABLE"  # NATS, for the dead-letter RPCs
    TRANSACTION_CONFLICT = "TRANSACTION_CONFLICT"
    INTERNAL = "INTERNAL"
    # RESOURCE_EXHAUSTED: the process serves as many calls as it may (MAX_CONCURRENT_RPCS),
    # or a peer or the process has as many streams open as it may.
    TOO_MANY_CALLS = "TOO_MANY_CALLS"
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
    # Sent by Envoy, not the server, to REST callers (envoy.yaml's local replies; gRPC
    # callers get the last two): the request never reached the server.
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    UNKNOWN_FIELD = "UNKNOWN_FIELD"  # a REST body field the method's message does not define
    ROUTE_NOT_FOUND = "ROUTE_NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"
    UPSTREAM_TIMEOUT = "UPSTREAM_TIMEOUT"
    EDGE_ERROR = "EDGE_ERROR"
    RATE_LIMITED = "RATE_LIMITED"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    type: str
    subject: str
    description: str


class DomainError(Exception):
    """Base of every error a caller can cause; never an internal fault."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one violation")
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(f"invalid request: {first.field}: {first.description}{more}")
        self.violations = tuple(violations)


class NotFound(DomainError):
    def __init__(self, resource_type: str, resource_id: str) -> None:
        super().__init__(f"{resource_type} {resource_id!r} not found")
        self.resource_type = resource_type
        self.resource_id = resource_id


class AlreadyExists(DomainError):
    def __init__(self, resource_type: str, key: str, message: str) -> None:
        super().__init__(message)
        self.resource_type = resource_type
        self.key = key


class FailedPrecondition(DomainError):
    """The request is well formed but the system's state does not allow it."""

    def __init__(
        self,
        message: str,
        *,
        reason: ErrorReason,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[PreconditionViolation] = (),
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)


@dataclass(frozen=True)
class StockShortage:
    product_id: str
    requested: int
    available: int


class OutOfStock(FailedPrecondition):
    def __init__(self, shortages: Sequence[StockShortage]) -> None:
        first = shortages[0]
        super().__init__(
            f"not enough stock for {len(shortages)} line(s)",
            reason=ErrorReason.OUT_OF_STOCK,
            metadata={
                "productId": first.product_id,
                "requested": str(first.requested),
                "available": str(first.available),
                "shortLines": str(len(shortages)),
            },
            violations=[
                PreconditionViolation(
                    type=ErrorReason.OUT_OF_STOCK,
                    subject=f"products/{s.product_id}",
                    description=f"requested {s.requested}, available {s.available}",
                )
                for s in shortages
            ],
        )
        self.shortages = tuple(shortages)


class RequestIdReused(FailedPrecondition):
    def __init__(self, request_id: str) -> None:
        super().__init__(
            "request_id was already used for a different request",
            reason=ErrorReason.REQUEST_ID_REUSED,
            metadata={"requestId": request_id},
        )


def check_replay(request_id: str, stored_fingerprint: str, fingerprint: str) -> None:
    """A request_id seen before answers with its first outcome only if the request repeats
    the first one exactly (AIP-155); anything else is RequestIdReused."""
    if stored_fingerprint != fingerprint:
        raise RequestIdReused(request_id)


class Unauthenticated(DomainError):
    def __init__(self, message: str, *, reason: ErrorReason = ErrorReason.INVALID_TOKEN) -> None:
        super().__init__(message)
        self.reason = reason


class PermissionDenied(DomainError):
    def __init__(self, message: str, *, required_role: str) -> None:
        super().__init__(message)
        self.required_role = required_role
