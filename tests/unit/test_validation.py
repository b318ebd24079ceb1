"""Field checks shared by every request: text, resource ids and request ids."""

from __future__ import annotations

import pytest

from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.validation import (
    Violations,
    check_request_id,
    check_resource_id,
    check_text,
    parse_resource_id,
)

pytestmark = pytest.mark.unit

PRODUCT_ID = "0b6c9a9e-3f43-4c1c-9f1e-0c1d2e3f4a5b"


def violations_of(violations: Violations) -> list[FieldViolation]:
    with pytest.raises(InvalidArgument) as raised:
        violations.raise_if_any()
    return list(raised.value.violations)


def test_no_violations_raise_nothing() -> None:
    violations = Violations()
    assert not violations
    violations.raise_if_any()


def test_violations_are_raised_together_in_order() -> None:
    violations = Violations()
    violations.add("a", "first")
    violations.add("b", "second")
    assert violations
    assert violations_of(violations) == [
        FieldViolation("a", "first"),
        FieldViolation("b", "second"),
    ]


@pytest.mark.parametrize("value", ["x", "plain text", "tab\tnewline\nreturn\r", "ünïcödé ✓"])
def test_text_within_bounds_passes(value: str) -> None:
    violations = Violations()
    check_text(violations, "name", value, min_len=1, max_len=200)
    assert not violations


def test_empty_required_text_is_required() -> None:
    violations = Violations()
    check_text(violations, "name", "", min_len=1, max_len=10)
    assert violations_of(violations) == [FieldViolation("name", "is required")]


def test_text_below_a_longer_minimum_names_the_minimum() -> None:
    violations = Violations()
    check_text(violations, "code", "ab", min_len=3, max_len=10)
    assert violations_of(violations) == [FieldViolation("code", "needs 3+ characters")]


def test_overlong_text_reports_limit_and_length() -> None:
    violations = Violations()
    check_text(violations, "description", "x" * 5_001, min_len=0, max_len=5_000)
    assert violations_of(violations) == [
        FieldViolation("description", "must be at most 5,000 characters (got 5,001)")
    ]


@pytest.mark.parametrize("control", ["\x00", "\x01", "\x1b", "\x1f", "\x0b", "\x0c"])
def test_control_characters_are_refused(control: str) -> None:
    violations = Violations()
    check_text(violations, "name", f"bad{control}name", min_len=1, max_len=200)
    assert violations_of(violations) == [
        FieldViolation("name", "must not contain control characters")
    ]


def test_length_and_control_characters_are_both_reported() -> None:
    violations = Violations()
    check_text(violations, "reason", "\x00" * 11, min_len=0, max_len=10)
    assert [v.description for v in violations_of(violations)] == [
        "must be at most 10 characters (got 11)",
        "must not contain control characters",
    ]


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (PRODUCT_ID, PRODUCT_ID),
        (PRODUCT_ID.upper(), PRODUCT_ID),
        ("0B6C9A9E-3f43-4C1C-9f1e-0C1D2E3F4A5B", PRODUCT_ID),
    ],
)
def test_resource_id_is_canonicalised(raw: str, canonical: str) -> None:
    violations = Violations()
    assert check_resource_id(violations, "id", raw) == canonical
    assert not violations


def test_missing_resource_id_is_required() -> None:
    violations = Violations()
    assert check_resource_id(violations, "id", "") is None
    assert violations_of(violations) == [FieldViolation("id", "is required")]


@pytest.mark.parametrize(
    "raw",
    [
        "not-a-uuid",
        PRODUCT_ID.replace("-", ""),  # uuid.UUID accepts it; our ids are canonical only
        "{" + PRODUCT_ID + "}",
        "urn:uuid:" + PRODUCT_ID,
        PRODUCT_ID + " ",
        PRODUCT_ID + "\n",
        PRODUCT_ID[:-1] + "g",
        "'; DROP TABLE products; --",
        f"{PRODUCT_ID}' OR '1'='1",
    ],
)
def test_malformed_resource_id_is_refused(raw: str) -> None:
    violations = Violations()
    assert check_resource_id(violations, "items[0].product_id", raw) is None
    [violation] = violations_of(violations)
    assert violation.field == "items[0].product_id"
    assert violation.description.startswith("must be a UUID")


def test_parse_resource_id_returns_canonical_or_raises() -> None:
    assert parse_resource_id("id", PRODUCT_ID.upper()) == PRODUCT_ID
    with pytest.raises(InvalidArgument) as raised:
        parse_resource_id("order_id", "42")
    assert [v.field for v in raised.value.violations] == ["order_id"]


@pytest.mark.parametrize(
    "value",
    ["a", PRODUCT_ID, "order:2024-01-01.retry_1", "A" + "b" * 99],
)
def test_good_request_ids_pass(value: str) -> None:
    violations = Violations()
    check_request_id(violations, "request_id", value, required=True)
    assert not violations


@pytest.mark.parametrize(
    "value",
    [
        "-leading-dash",
        ".leading-dot",
        "has space",
        "semi;colon",
        "A" * 101,
        "quote'",
        "newline\n",
        "ünïcode",
    ],
)
def test_bad_request_ids_are_refused(value: str) -> None:
    violations = Violations()
    check_request_id(violations, "request_id", value, required=True)
    assert violations_of(violations) == [
        FieldViolation("request_id", "must be 1-100 characters of [A-Za-z0-9._:-], e.g. a UUID")
    ]


def test_empty_request_id_is_required_only_when_required() -> None:
    optional = Violations()
    check_request_id(optional, "request_id", "", required=False)
    assert not optional

    required = Violations()
    check_request_id(required, "request_id", "", required=True)
    assert violations_of(required) == [
        FieldViolation("request_id", "is required (a UUID is recommended)")
    ]
