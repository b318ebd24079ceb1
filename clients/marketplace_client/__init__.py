"""Async Python client for the Marketplace gRPC API."""

from marketplace_client.client import MarketplaceClient, Page, TokenSource, follow_pages
from marketplace_client.errors import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    MarketplaceError,
    NotFoundError,
    OutOfStockError,
    PermissionDeniedError,
    PreconditionViolation,
    RequestIdReusedError,
    StockManagedByWarehouseError,
    UnauthenticatedError,
    UnavailableError,
)
from marketplace_client.money import to_decimal, to_money
from marketplace_client.retry import RetryPolicy

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "MarketplaceClient",
    "MarketplaceError",
    "NotFoundError",
    "OutOfStockError",
    "Page",
    "PermissionDeniedError",
    "PreconditionViolation",
    "RequestIdReusedError",
    "RetryPolicy",
    "StockManagedByWarehouseError",
    "TokenSource",
    "UnauthenticatedError",
    "UnavailableError",
    "follow_pages",
    "to_decimal",
    "to_money",
]
