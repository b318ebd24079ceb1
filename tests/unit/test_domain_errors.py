"""Domain errors carry what the API layer needs for rich statuses."""

from __future__ import annotations

import pytest

from server.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfStock,
    PreconditionViolation,
    RequestIdReused,
    StockShortage,
    Unauthenticated,
)

pytestmark = pytest.mark.unit


def test_invalid_argument_names_the_first_violation_and_keeps_them_all() -> None:
    violations = [FieldViolation("a", "is required"), FieldViolation("b.c", "is too long")]
    error = InvalidArgument(violations)
    assert error.message == "invalid request: a: is required (and 1 more)"
    assert str(error) == error.message
    assert error.violations == tuple(violations)


def test_invalid_argument_with_one_violation_has_no_count() -> None:
    error = InvalidArgument([FieldViolation("b.c", "is too long")])
    assert error.message == "invalid request: b.c: is too long"


def test_invalid_argument_message_stays_short_however_many_violations() -> None:
    violations = [FieldViolation(f"items[{n}].quantity", "must be positive") for n in range(300)]
    error = InvalidArgument(violations)
    assert error.message == "invalid request: items[0].quantity: must be positive (and 299 more)"
    assert len(error.violations) == 300


def test_not_found_names_the_resource() -> None:
    error = NotFound("order", "o-1")
    assert error.message == "order 'o-1' not found"
    assert (error.resource_type, error.resource_id) == ("order", "o-1")


def test_out_of_stock_describes_every_short_line() -> None:
    error = OutOfStock([StockShortage("p-1", 5, 2), StockShortage("p-2", 3, 0)])
    assert isinstance(error, FailedPrecondition)
    assert error.reason == "OUT_OF_STOCK"
    assert error.message == "not enough stock for 2 line(s)"
    assert error.metadata == {
        "productId": "p-1",
        "requested": "5",
        "available": "2",
        "shortLines": "2",
    }
    assert error.violations == (
        PreconditionViolation("OUT_OF_STOCK", "products/p-1", "requested 5, available 2"),
        PreconditionViolation("OUT_OF_STOCK", "products/p-2", "requested 3, available 0"),
    )
    assert len(error.shortages) == 2


def test_request_id_reused_has_no_violations() -> None:
    error = RequestIdReused("r-1")
    assert error.reason == "REQUEST_ID_REUSED"
    assert error.metadata == {"requestId": "r-1"}
    assert error.violations == ()


def test_failed_precondition_copies_its_metadata() -> None:
    metadata = {"k": "v"}
    error = FailedPrecondition("no", reason="R", metadata=metadata)
    metadata["k"] = "changed"
    assert error.metadata == {"k": "v"}


def test_unauthenticated_defaults_to_invalid_token() -> None:
    assert Unauthenticated("bad").reason == "INVALID_TOKEN"
