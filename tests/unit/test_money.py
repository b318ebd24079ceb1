"""Money: exact decimal amounts, google.type.Money splitting, and price validation."""

from __future__ import annotations

from decimal import Decimal

import pytest

from server.domain.money import (
    ISO_4217_CODES,
    MAX_UNIT_PRICE_UNITS,
    NANOS_PER_UNIT,
    Money,
    is_whole_minor_units,
    minor_unit_exponent,
    money_problems,
)
from server.domain.payments import from_minor_units, provider_exponent, to_minor_units

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("units", "nanos", "amount"),
    [
        (0, 0, "0"),
        (12, 500_000_000, "12.5"),
        (0, 1, "0.000000001"),
        (0, 999_999_999, "0.999999999"),
        (-1, -500_000_000, "-1.5"),
        (0, -1, "-0.000000001"),
        (-3, 0, "-3"),
        (999_999_999, 999_999_999, "999999999.999999999"),
    ],
)
def test_from_units_nanos_is_exact(units: int, nanos: int, amount: str) -> None:
    money = Money.from_units_nanos("USD", units, nanos)
    assert money.currency == "USD"
    assert money.amount == Decimal(amount)


@pytest.mark.parametrize(
    ("units", "nanos"),
    [
        (0, 0),
        (19, 990_000_000),
        (0, 1),
        (0, 999_999_999),
        (1, 0),
        (-1, -500_000_000),
        (0, -250_000_000),
        (-7, 0),
        (123_456_789, 987_654_321),
        (-123_456_789, -987_654_321),
    ],
)
def test_units_nanos_round_trips(units: int, nanos: int) -> None:
    assert Money.from_units_nanos("EUR", units, nanos).units_nanos() == (units, nanos)


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        ("44.99", (44, 990_000_000)),
        ("-44.99", (-44, -990_000_000)),
        ("-0.5", (0, -500_000_000)),
        ("0.5", (0, 500_000_000)),
        ("1000000", (1_000_000, 0)),
        # a sum of many line totals, well beyond one unit price
        ("99999999999999.999999999", (99_999_999_999_999, 999_999_999)),
    ],
)
def test_units_nanos_splits_with_one_sign_and_nanos_below_a_unit(
    amount: str, expected: tuple[int, int]
) -> None:
    units, nanos = Money("USD", Decimal(amount)).units_nanos()
    assert (units, nanos) == expected
    assert abs(nanos) < NANOS_PER_UNIT
    assert units * nanos >= 0, "units and nanos must never have opposite signs"


def test_times_multiplies_exactly() -> None:
    price = Money.from_units_nanos("USD", 0, 100_000_000)
    assert price.times(3) == Money("USD", Decimal("0.3"))
    assert price.times(0).amount == 0


def test_plus_adds_same_currency_exactly() -> None:
    total = Money("USD", Decimal("0.1")).plus(Money("USD", Decimal("0.2")))
    assert total == Money("USD", Decimal("0.3"))


def test_plus_refuses_another_currency() -> None:
    with pytest.raises(ValueError, match="cannot add EUR to USD"):
        Money("USD", Decimal(1)).plus(Money("EUR", Decimal(1)))


def test_money_is_immutable() -> None:
    money = Money("USD", Decimal(1))
    with pytest.raises(AttributeError):
        money.amount = Decimal(2)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("units", "nanos"),
    [(0, 0), (12, 500_000_000), (0, 999_999_999), (MAX_UNIT_PRICE_UNITS - 1, 999_999_999)],
)
def test_valid_prices_have_no_problems(units: int, nanos: int) -> None:
    assert money_problems("USD", units, nanos) == []


@pytest.mark.parametrize("currency", ["USD", "EUR", "JPY", "GBP", "CHF"])
def test_common_currencies_are_known(currency: str) -> None:
    assert currency in ISO_4217_CODES
    assert money_problems(currency, 1, 0) == []


@pytest.mark.parametrize("currency", ["usd", "US", "USDX", "", "XXX1", "ZZZ"])
def test_unknown_currency_is_a_problem(currency: str) -> None:
    assert money_problems(currency, 1, 0) == [f"currency_code {currency!r} is not an ISO 4217 code"]


def test_currency_in_the_message_is_truncated() -> None:
    [problem] = money_problems("A" * 500, 1, 0)
    assert problem == "currency_code 'AAAAAAAA' is not an ISO 4217 code"


@pytest.mark.parametrize("nanos", [NANOS_PER_UNIT, -NANOS_PER_UNIT, 5_000_000_000])
def test_nanos_out_of_range_is_a_problem(nanos: int) -> None:
    problems = money_problems("USD", 0, nanos)
    assert "nanos must be between -999,999,999 and 999,999,999" in problems
    assert "units and nanos must have the same sign" not in problems


@pytest.mark.parametrize(("units", "nanos"), [(1, -1), (-1, 1)])
def test_sign_mismatch_is_a_problem(units: int, nanos: int) -> None:
    problems = money_problems("USD", units, nanos)
    assert "units and nanos must have the same sign" in problems
    assert "amount must not be negative" in problems


@pytest.mark.parametrize(("units", "nanos"), [(-1, 0), (0, -1), (-5, -500_000_000)])
def test_negative_amount_is_a_problem(units: int, nanos: int) -> None:
    assert money_problems("USD", units, nanos) == ["amount must not be negative"]


@pytest.mark.parametrize("units", [MAX_UNIT_PRICE_UNITS, MAX_UNIT_PRICE_UNITS * 10])
def test_amount_of_a_billion_or_more_is_a_problem(units: int) -> None:
    assert money_problems("USD", units, 0) == ["amount must be below 1,000,000,000"]


def test_every_problem_is_reported_together() -> None:
    problems = money_problems("usd", -1, NANOS_PER_UNIT)
    assert problems == [
        "currency_code 'usd' is not an ISO 4217 code",
        "nanos must be between -999,999,999 and 999,999,999",
        "amount must not be negative",
    ]


@pytest.mark.parametrize(
    ("currency", "exponent"),
    [("USD", 2), ("EUR", 2), ("JPY", 0), ("KRW", 0), ("ISK", 0), ("KWD", 3), ("IQD", 3)],
)
def test_minor_units_are_iso_4217s(currency: str, exponent: int) -> None:
    assert minor_unit_exponent(currency) == exponent


@pytest.mark.parametrize("code", ["CLF", "BOV", "USN", "XAU", "XDR", "XTS", "XXX"])
def test_funds_metals_and_test_codes_are_not_price_currencies(code: str) -> None:
    assert code not in ISO_4217_CODES


def test_a_withdrawn_code_still_reads_with_two_decimals() -> None:
    """Rows priced before ISO withdrew their currency (the Bulgarian lev, 2026) stay readable."""
    assert "BGN" not in ISO_4217_CODES
    assert minor_unit_exponent("BGN") == 2


@pytest.mark.parametrize(
    ("amount", "whole"),
    [
        (Money("USD", Decimal("0.01")), True),
        (Money("USD", Decimal("0.001")), False),
        (Money("JPY", Decimal("100")), True),
        (Money("JPY", Decimal("100.5")), False),
        (Money("KWD", Decimal("1.001")), True),
        (Money("KWD", Decimal("1.0005")), False),
    ],
)
def test_whole_minor_units(amount: Money, whole: bool) -> None:
    assert is_whole_minor_units(amount) is whole


def test_provider_amounts_count_the_unit_stripe_counts() -> None:
    """ISO 4217 where Stripe follows it; the króna in hundredths and the ariary whole."""
    assert [provider_exponent(c) for c in ("USD", "JPY", "KWD", "ISK", "MGA")] == [2, 0, 3, 2, 0]
    assert to_minor_units(Money("ISK", Decimal(5))) == 500
    assert from_minor_units("ISK", 500) == Money("ISK", Decimal(5))
    assert to_minor_units(Money("MGA", Decimal(300))) == 300
    assert from_minor_units("MGA", 300) == Money("MGA", Decimal(300))
