"""Products: creation, partial updates and stock adjustments."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from server.domain.catalog import (
    MAX_INITIAL_STOCK,
    MAX_STOCK_DELTA,
    PriceInput,
    Product,
    ProductChanges,
    ProductDraft,
    StockAdjustment,
    new_product,
    product_changes,
    stock_adjustment,
)
from server.domain.errors import FieldViolation, InvalidArgument
from server.domain.money import Money

pytestmark = pytest.mark.unit

PRODUCT_ID = "0b6c9a9e-3f43-4c1c-9f1e-0c1d2e3f4a5b"
PRICE = PriceInput("USD", 12, 500_000_000)


def draft(**overrides: object) -> ProductDraft:
    fields: dict[str, object] = {
        "sku": "MUG-01",
        "name": "Mug",
        "description": "A mug.",
        "price": PRICE,
        "stock": 10,
    }
    fields.update(overrides)
    return new_product(**fields)  # type: ignore[arg-type]


def new_product_violations(**overrides: object) -> list[FieldViolation]:
    with pytest.raises(InvalidArgument) as raised:
        draft(**overrides)
    return list(raised.value.violations)


def changes(mask: list[str], **overrides: object) -> ProductChanges:
    fields: dict[str, object] = {
        "sku": "MUG-02",
        "name": "Big mug",
        "description": "A big mug.",
        "price": PriceInput("USD", 15, 0),
    }
    fields.update(overrides)
    return product_changes(mask, **fields)  # type: ignore[arg-type]


def change_violations(mask: list[str], **overrides: object) -> list[FieldViolation]:
    with pytest.raises(InvalidArgument) as raised:
        changes(mask, **overrides)
    return list(raised.value.violations)


def test_new_product_builds_a_draft_with_exact_price() -> None:
    assert draft() == ProductDraft(
        sku="MUG-01",
        name="Mug",
        description="A mug.",
        price=Money("USD", Decimal("12.5")),
        stock=10,
    )


@pytest.mark.parametrize("sku", ["A", "a.b_c-D9", "X" * 64])
def test_good_skus_are_accepted(sku: str) -> None:
    assert draft(sku=sku).sku == sku


@pytest.mark.parametrize(
    "sku", ["", "X" * 65, "has space", "MUG/01", "MUG-01\n", "ÄPFEL", "x'; --", "a*"]
)
def test_bad_skus_are_refused(sku: str) -> None:
    assert new_product_violations(sku=sku) == [
        FieldViolation("product.sku", "must be 1-64 characters of [A-Za-z0-9._-]")
    ]


@pytest.mark.parametrize("length", [1, 200])
def test_name_of_1_to_200_characters_is_accepted(length: int) -> None:
    assert len(draft(name="n" * length).name) == length


def test_empty_name_is_required() -> None:
    assert new_product_violations(name="") == [FieldViolation("product.name", "is required")]


def test_name_over_200_characters_is_refused() -> None:
    assert new_product_violations(name="n" * 201) == [
        FieldViolation("product.name", "must be at most 200 characters (got 201)")
    ]


@pytest.mark.parametrize("description", ["", "d" * 5_000, "line one\nline two\ttabbed"])
def test_description_up_to_5000_characters_is_accepted(description: str) -> None:
    assert draft(description=description).description == description


def test_description_over_5000_characters_is_refused() -> None:
    assert new_product_violations(description="d" * 5_001) == [
        FieldViolation("product.description", "must be at most 5,000 characters (got 5,001)")
    ]


@pytest.mark.parametrize("field", ["name", "description"])
def test_control_characters_in_text_are_refused(field: str) -> None:
    assert new_product_violations(**{field: "nul\x00byte"}) == [
        FieldViolation(f"product.{field}", "must not contain control characters")
    ]


def test_missing_price_is_required() -> None:
    assert new_product_violations(price=None) == [FieldViolation("product.price", "is required")]


def test_bad_price_reports_each_money_problem_on_price() -> None:
    violations = new_product_violations(price=PriceInput("usd", -1, 0))
    assert violations == [
        FieldViolation("product.price", "currency_code 'usd' is not an ISO 4217 code"),
        FieldViolation("product.price", "amount must not be negative"),
    ]


@pytest.mark.parametrize(
    "price",
    [
        PriceInput("USD", 0, 10_000_000),  # one cent
        PriceInput("JPY", 100, 0),
        PriceInput("KWD", 1, 234_000_000),  # three decimals
        PriceInput("ISK", 5, 0),
        PriceInput("MGA", 10, 0),
    ],
)
def test_chargeable_prices_are_accepted(price: PriceInput) -> None:
    assert draft(price=price).price == Money.from_units_nanos(
        price.currency, price.units, price.nanos
    )


@pytest.mark.parametrize(
    ("price", "problem"),
    [
        (PriceInput("USD", 0, 0), "amount must be greater than zero"),
        (PriceInput("JPY", 0, 0), "amount must be greater than zero"),
        (PriceInput("USD", 0, 1_000_000), "amount must be a whole multiple of 0.01 USD"),
        (PriceInput("USD", 19, 999_000_000), "amount must be a whole multiple of 0.01 USD"),
        (PriceInput("JPY", 100, 500_000_000), "amount must be a whole multiple of 1 JPY"),
        (PriceInput("KWD", 1, 500_000), "amount must be a whole multiple of 0.001 KWD"),
        (PriceInput("ISK", 5, 500_000_000), "amount must be a whole multiple of 1 ISK"),
        # ISO gives the ariary two decimals, but the card provider charges whole ariary
        (PriceInput("MGA", 10, 500_000_000), "amount must be a whole multiple of 1 MGA"),
    ],
)
def test_prices_that_cannot_be_charged_are_refused(price: PriceInput, problem: str) -> None:
    assert new_product_violations(price=price) == [FieldViolation("product.price", problem)]
    assert change_violations(["price"], price=price) == [FieldViolation("product.price", problem)]


def test_an_unchanged_price_is_not_checked() -> None:
    assert changes(["name"], price=PriceInput("USD", 0, 0)) == ProductChanges(name="Big mug")


@pytest.mark.parametrize("stock", [0, MAX_INITIAL_STOCK])
def test_stock_bounds_are_accepted(stock: int) -> None:
    assert draft(stock=stock).stock == stock


@pytest.mark.parametrize("stock", [-1, MAX_INITIAL_STOCK + 1])
def test_stock_out_of_bounds_is_refused(stock: int) -> None:
    assert new_product_violations(stock=stock) == [
        FieldViolation("product.stock", "must be between 0 and 1,000,000,000")
    ]


def test_new_product_lists_every_problem() -> None:
    violations = new_product_violations(sku="", name="", description="\x07", price=None, stock=-5)
    assert [v.field for v in violations] == [
        "product.price",
        "product.sku",
        "product.name",
        "product.description",
        "product.stock",
    ]


def test_changes_cover_only_masked_fields() -> None:
    assert changes(["name"]) == ProductChanges(name="Big mug")
    assert changes(["sku", "price"]) == ProductChanges(
        sku="MUG-02", price=Money("USD", Decimal(15))
    )


def test_every_updatable_field_can_change() -> None:
    assert changes(["sku", "name", "description", "price"]) == ProductChanges(
        sku="MUG-02",
        name="Big mug",
        description="A big mug.",
        price=Money("USD", Decimal(15)),
    )


def test_fields_outside_the_mask_are_not_validated() -> None:
    result = changes(["description"], sku="bad sku!", name="", price=PriceInput("???", -1, 0))
    assert result == ProductChanges(description="A big mug.")


def test_empty_mask_is_refused() -> None:
    assert change_violations([]) == [FieldViolation("update_mask", "names no field to update")]


def test_stock_in_mask_points_to_adjust_stock() -> None:
    assert change_violations(["stock"]) == [
        FieldViolation("update_mask", "'stock' is changed only by AdjustStock")
    ]


@pytest.mark.parametrize("path", ["id", "create_time", "price.units", "*", "nonsense"])
def test_unknown_mask_paths_are_refused(path: str) -> None:
    assert change_violations(["name", path]) == [
        FieldViolation("update_mask", f"{path!r} cannot be updated")
    ]


def test_price_in_mask_needs_a_price() -> None:
    assert change_violations(["price"], price=None) == [
        FieldViolation("product.price", "is required when in update_mask")
    ]


def test_masked_fields_are_validated() -> None:
    violations = change_violations(
        ["sku", "name", "description", "price"],
        sku="no spaces allowed",
        name="",
        description="x" * 5_001,
        price=PriceInput("USD", 0, 1_000_000_000),
    )
    assert violations == [
        FieldViolation("product.sku", "must be 1-64 characters of [A-Za-z0-9._-]"),
        FieldViolation("product.name", "is required"),
        FieldViolation("product.description", "must be at most 5,000 characters (got 5,001)"),
        FieldViolation("product.price", "nanos must be between -999,999,999 and 999,999,999"),
    ]


def test_changes_apply_only_what_they_carry() -> None:
    moment = datetime(2024, 1, 1, tzinfo=UTC)
    product = Product(
        id=PRODUCT_ID,
        sku="MUG-01",
        name="Mug",
        description="A mug.",
        price=Money("USD", Decimal("12.5")),
        stock=7,
        create_time=moment,
        update_time=moment,
    )
    updated = ProductChanges(name="Big mug", price=Money("USD", Decimal(15))).apply_to(product)
    assert updated.name == "Big mug"
    assert updated.price == Money("USD", Decimal(15))
    assert (updated.id, updated.sku, updated.description, updated.stock) == (
        PRODUCT_ID,
        "MUG-01",
        "A mug.",
        7,
    )
    assert ProductChanges(description="").apply_to(product).description == ""
    assert ProductChanges().apply_to(product) == product


def test_stock_adjustment_canonicalises_the_product_id() -> None:
    adjustment = stock_adjustment(PRODUCT_ID.upper(), -3, "damaged", "adj-1")
    assert adjustment == StockAdjustment(PRODUCT_ID, -3, "damaged", "adj-1")


@pytest.mark.parametrize("delta", [1, -1, MAX_STOCK_DELTA, -MAX_STOCK_DELTA])
def test_stock_delta_within_bounds_is_accepted(delta: int) -> None:
    assert stock_adjustment(PRODUCT_ID, delta, "", "adj-1").delta == delta


def test_zero_delta_is_refused() -> None:
    with pytest.raises(InvalidArgument) as raised:
        stock_adjustment(PRODUCT_ID, 0, "", "adj-1")
    assert raised.value.violations == (FieldViolation("delta", "must not be zero"),)


@pytest.mark.parametrize("delta", [MAX_STOCK_DELTA + 1, -MAX_STOCK_DELTA - 1])
def test_fat_finger_delta_is_refused(delta: int) -> None:
    with pytest.raises(InvalidArgument) as raised:
        stock_adjustment(PRODUCT_ID, delta, "", "adj-1")
    assert raised.value.violations == (
        FieldViolation("delta", "must be at most 1,000,000,000 units either way"),
    )


def test_stock_adjustment_lists_every_problem() -> None:
    with pytest.raises(InvalidArgument) as raised:
        stock_adjustment("42", 0, "r" * 501, "")
    assert raised.value.violations == (
        FieldViolation("id", "must be a UUID like 0b6c9a9e-3f43-4c1c-9f1e-0c1d2e3f4a5b"),
        FieldViolation("delta", "must not be zero"),
        FieldViolation("reason", "must be at most 500 characters (got 501)"),
        FieldViolation("request_id", "is required (a UUID is recommended)"),
    )


def test_stock_adjustment_reason_refuses_control_characters() -> None:
    with pytest.raises(InvalidArgument) as raised:
        stock_adjustment(PRODUCT_ID, 1, "a\x1fb", "adj-1")
    assert [v.field for v in raised.value.violations] == ["reason"]


def test_adjustment_fingerprint_tells_content_apart() -> None:
    def fingerprint(product_id: str, delta: int, reason: str, request_id: str) -> str:
        return stock_adjustment(product_id, delta, reason, request_id).fingerprint()

    other_product = "0b6c9a9e-3f43-4c1c-9f1e-0c1d2e3f4a5c"
    base = fingerprint(PRODUCT_ID, 5, "delivery", "adj-1")
    assert fingerprint(PRODUCT_ID, 5, "delivery", "adj-2") == base, "a retry under a new id"
    assert fingerprint(PRODUCT_ID, 6, "delivery", "adj-1") != base
    assert fingerprint(PRODUCT_ID, 5, "return", "adj-1") != base
    assert fingerprint(other_product, 5, "delivery", "adj-1") != base
