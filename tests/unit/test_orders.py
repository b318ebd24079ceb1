"""Order requests, totals and the cancellation rule."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from server.domain.errors import FailedPrecondition, FieldViolation, InvalidArgument
from server.domain.money import Money
from server.domain.orders import (
    MAX_LINES,
    LineRequest,
    OrderLine,
    OrderRequest,
    order_request,
    order_total,
)

pytestmark = pytest.mark.unit

A = "00000000-0000-4000-8000-00000000000a"
B = "00000000-0000-4000-8000-00000000000b"
C = "00000000-0000-4000-8000-00000000000c"


def product_ids(count: int) -> list[str]:
    return [str(uuid.UUID(int=n + 1)) for n in range(count)]


def violations_for(request_id: str, items: list[tuple[str, int]]) -> list[FieldViolation]:
    with pytest.raises(InvalidArgument) as raised:
        order_request(request_id, items)
    return list(raised.value.violations)


def fields_for(request_id: str, items: list[tuple[str, int]]) -> list[str]:
    return [v.field for v in violations_for(request_id, items)]


def test_valid_request_keeps_lines_in_the_callers_order() -> None:
    request = order_request("r-1", [(B, 2), (A, 1)])
    assert request == OrderRequest("r-1", (LineRequest(B, 2), LineRequest(A, 1)))


def test_product_ids_are_canonicalised() -> None:
    request = order_request("r-1", [(A.upper(), 3)])
    assert request.lines == (LineRequest(A, 3),)


@pytest.mark.parametrize("quantity", [1, 500, 1_000])
def test_quantities_within_bounds_are_accepted(quantity: int) -> None:
    assert order_request("r-1", [(A, quantity)]).lines[0].quantity == quantity


def test_exactly_max_lines_is_accepted() -> None:
    request = order_request("r-1", [(pid, 1) for pid in product_ids(MAX_LINES)])
    assert len(request.lines) == MAX_LINES


def test_no_items_is_refused() -> None:
    assert violations_for("r-1", []) == [FieldViolation("items", "needs at least one line")]


def test_more_than_max_lines_is_refused() -> None:
    violations = violations_for("r-1", [(pid, 1) for pid in product_ids(MAX_LINES + 1)])
    assert violations == [FieldViolation("items", "must have at most 100 lines (got 101)")]


def test_a_huge_request_is_not_checked_line_by_line() -> None:
    items = [("bad", 0)] * 10_000
    violations = violations_for("r-1", items)
    assert violations[0] == FieldViolation("items", "must have at most 100 lines (got 10000)")
    # only the first MAX_LINES + 1 lines are looked at, two problems each
    assert len(violations) == 1 + 2 * (MAX_LINES + 1)
    assert violations[-1].field == "items[100].quantity"


@pytest.mark.parametrize("quantity", [0, -1, 1_001, 10**12])
def test_quantity_out_of_range_is_refused(quantity: int) -> None:
    assert violations_for("r-1", [(A, 1), (B, quantity)]) == [
        FieldViolation("items[1].quantity", "must be between 1 and 1,000")
    ]


@pytest.mark.parametrize(
    "product_id",
    [
        "",
        "not-a-uuid",
        "'; DROP TABLE products; --",
        "1 OR 1=1",
        f"{A}'--",
        "../../etc/passwd",
    ],
)
def test_malformed_or_hostile_product_id_is_refused(product_id: str) -> None:
    [violation] = violations_for("r-1", [(A, 1), (product_id, 1)])
    assert violation.field == "items[1].product_id"
    assert violation.description in {
        "is required",
        "must be a UUID like 0b6c9a9e-3f43-4c1c-9f1e-0c1d2e3f4a5b",
    }


def test_duplicate_product_points_at_its_first_line() -> None:
    violations = violations_for("r-1", [(A, 1), (B, 1), (A, 2)])
    assert violations == [
        FieldViolation(
            "items[2].product_id",
            "repeats items[0]; order a product once with a larger quantity",
        )
    ]


def test_duplicates_are_found_across_spellings_of_one_uuid() -> None:
    assert fields_for("r-1", [(A, 1), (A.upper(), 1)]) == ["items[1].product_id"]


def test_every_repeat_points_at_the_first_occurrence() -> None:
    descriptions = [v.description for v in violations_for("r-1", [(A, 1), (A, 1), (A, 1)])]
    assert descriptions == [
        "repeats items[0]; order a product once with a larger quantity",
        "repeats items[0]; order a product once with a larger quantity",
    ]


@pytest.mark.parametrize("request_id", ["", " ", "bad id", "-x", "x" * 101, "r;1"])
def test_bad_request_id_is_refused(request_id: str) -> None:
    assert fields_for(request_id, [(A, 1)]) == ["request_id"]


def test_every_problem_is_listed_with_its_field_path() -> None:
    items = [(A, 1), (B, 0), ("nope", 5), (C, 1_001), (A, -1)]
    violations = violations_for("", items)
    assert [v.field for v in violations] == [
        "request_id",
        "items[1].quantity",
        "items[2].product_id",
        "items[3].quantity",
        "items[4].quantity",
        "items[4].product_id",
    ]
    assert violations[-1].description.startswith("repeats items[0]")


def test_invalid_argument_message_names_the_first_violation_and_counts_the_rest() -> None:
    with pytest.raises(InvalidArgument) as raised:
        order_request("", [(A, 0)])
    assert raised.value.message == (
        "invalid request: request_id: is required (a UUID is recommended) (and 1 more)"
    )
    assert [v.field for v in raised.value.violations] == ["request_id", "items[0].quantity"]


def test_lines_in_lock_order_are_sorted_by_product_id() -> None:
    request = order_request("r-1", [(C, 3), (A, 1), (B, 2)])
    assert request.lines_in_lock_order() == [
        LineRequest(A, 1),
        LineRequest(B, 2),
        LineRequest(C, 3),
    ]
    assert [line.product_id for line in request.lines] == [C, A, B], "the request is unchanged"


def test_fingerprint_ignores_line_order() -> None:
    first = order_request("r-1", [(A, 1), (B, 2), (C, 3)])
    second = order_request("r-1", [(C, 3), (A, 1), (B, 2)])
    assert first.fingerprint() == second.fingerprint()


def test_fingerprint_ignores_the_spelling_of_ids() -> None:
    assert (
        order_request("r-1", [(A, 1)]).fingerprint()
        == order_request("r-1", [(A.upper(), 1)]).fingerprint()
    )


def test_fingerprint_depends_on_quantities_and_products() -> None:
    base = order_request("r-1", [(A, 1), (B, 2)]).fingerprint()
    assert order_request("r-1", [(A, 2), (B, 1)]).fingerprint() != base
    assert order_request("r-1", [(A, 1), (B, 3)]).fingerprint() != base
    assert order_request("r-1", [(A, 1), (C, 2)]).fingerprint() != base
    assert order_request("r-1", [(A, 1)]).fingerprint() != base


def test_fingerprint_is_a_sha256_hex_digest() -> None:
    fingerprint = order_request("r-1", [(A, 1)]).fingerprint()
    assert len(fingerprint) == 64
    assert int(fingerprint, 16) >= 0


def line(product_id: str, quantity: int, price: str, currency: str = "USD") -> OrderLine:
    return OrderLine(product_id, f"SKU-{product_id[-1]}", quantity, Money(currency, Decimal(price)))


def test_line_total_is_price_times_quantity() -> None:
    assert line(A, 3, "19.99").line_total == Money("USD", Decimal("59.97"))


def test_order_total_sums_line_totals_exactly() -> None:
    total = order_total([line(A, 2, "12.50"), line(B, 1, "19.99"), line(C, 3, "0.10")])
    assert total == Money("USD", Decimal("45.29"))


def test_order_total_of_one_line_keeps_its_currency() -> None:
    assert order_total([line(A, 1, "1000", "JPY")]) == Money("JPY", Decimal(1000))


def test_order_total_refuses_mixed_currencies() -> None:
    lines = [line(A, 1, "1", "USD"), line(B, 1, "1", "EUR"), line(C, 1, "1", "USD")]
    with pytest.raises(FailedPrecondition) as raised:
        order_total(lines)
    error = raised.value
    assert error.reason == "MIXED_CURRENCIES"
    assert error.metadata == {"currencies": "EUR,USD"}
    assert [(v.type, v.subject, v.description) for v in error.violations] == [
        ("MIXED_CURRENCIES", f"products/{A}", "priced in USD"),
        ("MIXED_CURRENCIES", f"products/{B}", "priced in EUR"),
        ("MIXED_CURRENCIES", f"products/{C}", "priced in USD"),
    ]
