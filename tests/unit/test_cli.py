"""The command line's decisions that need no server: how a CSV row is read and compared with
a product, the derived stock request ids, how money is shown, and how a refusal is printed
and mapped to an exit code."""

from __future__ import annotations

from decimal import Decimal

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from marketplace.catalog.v1 import catalog_pb2
from marketplace_cli.exits import Exit, error_json, error_lines, exit_code_of
from marketplace_cli.importer import (
    ImportFileError,
    Outcome,
    Row,
    RowResult,
    changed_fields,
    parse_rows,
    stock_request_id,
)
from marketplace_cli.render import money
from marketplace_client import (
    FieldViolation,
    MarketplaceError,
    OutOfStockError,
    PreconditionViolation,
    to_money,
)

pytestmark = pytest.mark.unit

HEADER = "sku,name,description,price,currency,stock\n"


def product(**fields: object) -> catalog_pb2.Product:
    base = catalog_pb2.Product(
        id="4f9e1c9a-0000-4000-8000-000000000001",
        sku="MUG-1",
        name="Mug",
        description="Blue",
        price=to_money("12.50", "USD"),
        stock=10,
        update_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
    )
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(base, name).CopyFrom(value)
        else:
            setattr(base, name, value)
    return base


def row(**fields: object) -> Row:
    values: dict[str, object] = {
        "line": 2,
        "sku": "MUG-1",
        "name": "Mug",
        "description": "Blue",
        "price": Decimal("12.5"),
        "currency": "USD",
        "stock": 10,
    }
    return Row(**(values | fields))  # type: ignore[arg-type]


def test_rows_are_parsed_with_quoted_commas_and_an_empty_stock() -> None:
    rows = parse_rows(HEADER + 'MUG-1,Mug,"Blue, big",12.50,usd,10\nTEE-1,Tee,,19.99,EUR,\n')
    assert rows == [
        Row(2, "MUG-1", "Mug", "Blue, big", Decimal("12.50"), "USD", 10),
        Row(3, "TEE-1", "Tee", "", Decimal("19.99"), "EUR", None),
    ]


def test_a_header_without_description_is_enough_and_case_does_not_matter() -> None:
    rows = parse_rows("SKU,Name,Price,Currency,Stock\nMUG-1,Mug,1,USD,0\n")
    assert rows == [Row(2, "MUG-1", "Mug", "", Decimal(1), "USD", 0)]


def test_a_header_lacking_columns_is_refused_as_a_whole() -> None:
    with pytest.raises(ImportFileError, match="lacks price, currency"):
        parse_rows("sku,name,stock\nA,B,1\n")


@pytest.mark.parametrize(
    ("cells", "reason"),
    [
        ("12,50", "price: '12,50' is not a number"),
        ("NaN", "price: 'NaN' is not a number"),
        ("0.0000000001", "price: Decimal('1E-10') has more than nine decimal places"),
    ],
)
def test_a_bad_price_refuses_only_its_row(cells: str, reason: str) -> None:
    rows = parse_rows(HEADER + f'BAD,Bad,,"{cells}",USD,1\nGOOD,Good,,1,USD,1\n')
    assert rows[0] == RowResult(2, "BAD", Outcome.REFUSED, reason)
    assert isinstance(rows[1], Row)


def test_bad_currency_and_stock_cells_are_refused() -> None:
    rows = parse_rows(HEADER + "A,A,,1,US,1\nB,B,,1,USD,-1\nC,C,,1,USD,1.5\n")
    assert [r.detail for r in rows if isinstance(r, RowResult)] == [
        "currency: 'US' is not a three-letter ISO 4217 code",
        "stock: '-1' is not a whole number of units (0 or more)",
        "stock: '1.5' is not a whole number of units (0 or more)",
    ]


def test_a_repeated_sku_keeps_the_first_row() -> None:
    rows = parse_rows(HEADER + "A,First,,1,USD,1\nA,Second,,2,USD,1\n")
    assert isinstance(rows[0], Row)
    assert rows[1] == RowResult(
        3, "A", Outcome.REFUSED, "sku A is also on line 2; the first one is used"
    )


def test_an_equal_row_changes_nothing() -> None:
    assert changed_fields(product(), row()) == {}


def test_only_the_differing_fields_are_updated_and_price_goes_with_its_currency() -> None:
    assert changed_fields(product(), row(name="Big mug", price=Decimal("13"))) == {
        "name": "Big mug",
        "price": Decimal("13"),
        "currency": "USD",
    }
    assert changed_fields(product(), row(currency="EUR")) == {
        "price": Decimal("12.5"),
        "currency": "EUR",
    }


def test_the_stock_request_id_is_derived_from_the_product_as_read_and_the_target() -> None:
    read = product()
    assert stock_request_id(read, 15) == stock_request_id(product(), 15)
    assert stock_request_id(read, 15) != stock_request_id(read, 16)
    # The same move again after the product changed (orders took stock back to 10) is a
    # new adjustment, not a replay of the first one.
    later = product(update_time=timestamp_pb2.Timestamp(seconds=1_700_000_100))
    assert stock_request_id(later, 15) != stock_request_id(read, 15)


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        ("12.5", "USD", "12.50 USD"),
        ("1800", "JPY", "1800 JPY"),
        ("1.234", "KWD", "1.234 KWD"),
        ("0.125", "USD", "0.125 USD"),  # never rounded away
        ("2.50", "XYZ", "2.5 XYZ"),  # no minor units known
    ],
)
def test_money_is_shown_in_the_currency_s_minor_units(
    amount: str, currency: str, shown: str
) -> None:
    assert money(to_money(amount, currency)) == shown


def test_an_out_of_stock_refusal_names_each_short_line() -> None:
    error = OutOfStockError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "not enough stock for 1 line(s)",
        reason="OUT_OF_STOCK",
        precondition_violations=[
            PreconditionViolation("OUT_OF_STOCK", "products/p1", "requested 5, available 2")
        ],
    )
    assert error_lines(error, {"products/p1": "MUG-1"}) == [
        "FAILED_PRECONDITION: not enough stock for 1 line(s) (OUT_OF_STOCK)",
        "  MUG-1 (products/p1): requested 5, available 2",
    ]
    assert exit_code_of(error) is Exit.REFUSED


def test_a_bad_field_is_printed_and_serialised() -> None:
    error = MarketplaceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid product",
        field_violations=[FieldViolation("product.price", "JPY has no minor units")],
    )
    assert error_lines(error)[1] == "  product.price: JPY has no minor units"
    assert error_json(error) == {
        "error": {
            "code": "INVALID_ARGUMENT",
            "message": "invalid product",
            "fieldViolations": [
                {"field": "product.price", "description": "JPY has no minor units"}
            ],
        }
    }


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.UNAVAILABLE, Exit.UNAVAILABLE),
        (grpc.StatusCode.DEADLINE_EXCEEDED, Exit.UNAVAILABLE),
        (grpc.StatusCode.NOT_FOUND, Exit.REFUSED),
        (grpc.StatusCode.UNAUTHENTICATED, Exit.REFUSED),
        (grpc.StatusCode.INTERNAL, Exit.FAILED),
    ],
)
def test_exit_codes_tell_refusal_from_unavailability(
    code: grpc.StatusCode, exit_code: Exit
) -> None:
    assert exit_code_of(MarketplaceError(code, "x")) is exit_code
