"""Domain errors. The API layer maps each kind to one gRPC status, in one place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


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
        reason: str,
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
            reason="OUT_OF_STOCK",
            metadata={
                "productId": first.product_id,
                "requested": str(first.requested),
                "available": str(first.available),
                "shortLines": str(len(shortages)),
            },
            violations=[
                PreconditionViolation(
                    type="OUT_OF_STOCK",
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
            reason="REQUEST_ID_REUSED",
            metadata={"requestId": request_id},
        )


class Unauthenticated(DomainError):
    def __init__(self, message: str, *, reason: str = "INVALID_TOKEN") -> None:
        super().__init__(message)
        self.reason = reason


class PermissionDenied(DomainError):
    def __init__(self, message: str, *, required_role: str) -> None:
        super().__init__(message)
        self.required_role = required_role
