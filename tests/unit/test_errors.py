"""Domain and infrastructure errors become gRPC statuses with rich details (AIP-193)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import message as protobuf_message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from server.api.errors import (
    ERROR_DOMAIN,
    MAX_LISTED_VIOLATIONS,
    domain_error_status,
    infrastructure_error_status,
    internal_status,
)
from server.domain.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfStock,
    PermissionDenied,
    PreconditionViolation,
    RequestIdReused,
    StockShortage,
    Unauthenticated,
)
from server.domain.identity import Role
from server.domain.orders import order_request

pytestmark = pytest.mark.unit

DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FinishedCall:
    """What a client sees of a failed call: enough of grpc.Call for rpc_status.from_call."""

    status: grpc.Status

    def code(self) -> grpc.StatusCode:
        return self.status.code

    def details(self) -> str:
        return self.status.details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(self.status.trailing_metadata)


def rich_status(status: grpc.Status) -> status_pb2.Status:
    """Unpacks the trailer as a client would; from_call also checks code and message agree."""
    [(key, value)] = status.trailing_metadata
    assert key == DETAILS_KEY
    assert status_pb2.Status.FromString(value) == rpc_status.from_call(FinishedCall(status))
    proto: status_pb2.Status = rpc_status.from_call(FinishedCall(status))
    assert proto.code == status.code.value[0]
    assert proto.message == status.details
    return proto


def details_of(status: grpc.Status) -> list[protobuf_message.Message]:
    unpacked: list[protobuf_message.Message] = []
    kinds: list[type[protobuf_message.Message]] = [
        error_details_pb2.BadRequest,
        error_details_pb2.ErrorInfo,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.ResourceInfo,
        error_details_pb2.RetryInfo,
    ]
    for packed in rich_status(status).details:
        for kind in kinds:
            if packed.Is(kind.DESCRIPTOR):
                detail = kind()
                assert packed.Unpack(detail)
                unpacked.append(detail)
                break
        else:
            pytest.fail(f"unexpected detail type {packed.type_url}")
    return unpacked


def error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)


def test_invalid_argument_carries_error_info_then_every_field_violation() -> None:
    error = InvalidArgument(
        [
            FieldViolation("request_id", "is required"),
            FieldViolation("items[3].quantity", "must be between 1 and 1,000"),
        ]
    )
    status = domain_error_status(error)
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "invalid request: request_id: is required (and 1 more)"
    assert status.details == error.message
    assert details_of(status) == [
        error_info("INVALID_ARGUMENT", violationCount="2"),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="request_id", description="is required"
                ),
                error_details_pb2.BadRequest.FieldViolation(
                    field="items[3].quantity", description="must be between 1 and 1,000"
                ),
            ]
        ),
    ]


def test_invalid_argument_lists_the_first_violations_and_counts_them_all() -> None:
    assert MAX_LISTED_VIOLATIONS == 25
    violations = [FieldViolation(f"items[{n}].quantity", f"problem {n}") for n in range(60)]
    status = domain_error_status(InvalidArgument(violations))
    assert status.details == "invalid request: items[0].quantity: problem 0 (and 59 more)"
    assert details_of(status) == [
        error_info("INVALID_ARGUMENT", violationCount="60"),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in violations[:25]
            ]
        ),
    ]


@pytest.mark.parametrize("count", [MAX_LISTED_VIOLATIONS, MAX_LISTED_VIOLATIONS + 1])
def test_violation_list_is_cut_exactly_at_the_limit(count: int) -> None:
    violations = [FieldViolation(f"f{n}", "d") for n in range(count)]
    info, bad_request = details_of(domain_error_status(InvalidArgument(violations)))
    assert info == error_info("INVALID_ARGUMENT", violationCount=str(count))
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == [f"f{n}" for n in range(25)]


def test_order_validation_reaches_the_client_with_field_paths() -> None:
    product = "0b6c9a9e-3f43-4c1c-9f1e-0c1d2e3f4a5b"
    with pytest.raises(InvalidArgument) as raised:
        order_request("r-1", [(product, 1), ("'; DROP TABLE orders; --", 0)])
    info, bad_request = details_of(domain_error_status(raised.value))
    assert info == error_info("INVALID_ARGUMENT", violationCount="2")
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == [
        "items[1].product_id",
        "items[1].quantity",
    ]


def test_not_found_names_the_resource() -> None:
    status = domain_error_status(NotFound("order", "o-1"))
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert status.details == "order 'o-1' not found"
    assert details_of(status) == [
        error_info("NOT_FOUND", resourceType="order"),
        error_details_pb2.ResourceInfo(resource_type="order", resource_name="o-1"),
    ]


def test_already_exists_carries_reason_and_resource() -> None:
    status = domain_error_status(AlreadyExists("product", "MUG-01", "sku 'MUG-01' is taken"))
    assert status.code is grpc.StatusCode.ALREADY_EXISTS
    assert status.details == "sku 'MUG-01' is taken"
    assert details_of(status) == [
        error_info("ALREADY_EXISTS", key="MUG-01"),
        error_details_pb2.ResourceInfo(resource_type="product", resource_name="MUG-01"),
    ]


def test_out_of_stock_carries_error_info_and_precondition_failure() -> None:
    error = OutOfStock([StockShortage("p-1", 5, 2), StockShortage("p-2", 3, 0)])
    status = domain_error_status(error)
    assert status.code is grpc.StatusCode.FAILED_PRECONDITION
    assert status.details == "not enough stock for 2 line(s)"
    assert details_of(status) == [
        error_info("OUT_OF_STOCK", productId="p-1", requested="5", available="2", shortLines="2"),
        error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="OUT_OF_STOCK",
                    subject="products/p-1",
                    description="requested 5, available 2",
                ),
                error_details_pb2.PreconditionFailure.Violation(
                    type="OUT_OF_STOCK",
                    subject="products/p-2",
                    description="requested 3, available 0",
                ),
            ]
        ),
    ]


def test_out_of_stock_lists_the_first_short_lines_and_counts_them_all() -> None:
    shortages = [StockShortage(f"p-{n}", n + 1, n) for n in range(40)]
    info, failure = details_of(domain_error_status(OutOfStock(shortages)))
    assert info == error_info(
        "OUT_OF_STOCK", productId="p-0", requested="1", available="0", shortLines="40"
    )
    assert failure == error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type="OUT_OF_STOCK",
                subject=f"products/p-{n}",
                description=f"requested {n + 1}, available {n}",
            )
            for n in range(25)
        ]
    )


def test_generic_failed_precondition_lists_at_most_the_limit() -> None:
    violations = [PreconditionViolation("T", f"s{n}", "d") for n in range(30)]
    error = FailedPrecondition("no", reason="R", violations=violations)
    info, failure = details_of(domain_error_status(error))
    assert info == error_info("R")
    assert isinstance(failure, error_details_pb2.PreconditionFailure)
    assert [v.subject for v in failure.violations] == [f"s{n}" for n in range(25)]


def test_precondition_without_violations_carries_only_error_info() -> None:
    status = domain_error_status(RequestIdReused("r-1"))
    assert status.code is grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(status) == [error_info("REQUEST_ID_REUSED", requestId="r-1")]


def test_generic_failed_precondition_keeps_reason_and_metadata() -> None:
    error = FailedPrecondition(
        "cannot cancel", reason="ORDER_NOT_CANCELLABLE", metadata={"orderId": "o-1"}
    )
    status = domain_error_status(error)
    assert status.code is grpc.StatusCode.FAILED_PRECONDITION
    assert status.details == "cannot cancel"
    assert details_of(status) == [error_info("ORDER_NOT_CANCELLABLE", orderId="o-1")]


@pytest.mark.parametrize("reason", ["INVALID_TOKEN", "MISSING_TOKEN", "TOKEN_EXPIRED"])
def test_unauthenticated_carries_the_reason(reason: str) -> None:
    status = domain_error_status(Unauthenticated("no entry", reason=reason))
    assert status.code is grpc.StatusCode.UNAUTHENTICATED
    assert status.details == "no entry"
    assert details_of(status) == [error_info(reason)]


@pytest.mark.parametrize("role", [Role.ADMIN, Role.CUSTOMER])
def test_permission_denied_names_the_missing_role(role: Role) -> None:
    status = domain_error_status(PermissionDenied("not yours", required_role=role))
    assert status.code is grpc.StatusCode.PERMISSION_DENIED
    assert details_of(status) == [error_info("MISSING_ROLE", requiredRole=role.value)]


def test_unmapped_domain_error_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="no status for DomainError"):
        domain_error_status(DomainError("???"))


EVERY_KIND_OF_DOMAIN_ERROR: list[DomainError] = [
    InvalidArgument([FieldViolation("f", "d")]),
    NotFound("order", "o"),
    AlreadyExists("product", "k", "m"),
    RequestIdReused("r"),
    Unauthenticated("u"),
    PermissionDenied("p", required_role=Role.ADMIN),
]


def test_every_status_code_matches_the_rich_status_code() -> None:
    errors = EVERY_KIND_OF_DOMAIN_ERROR
    codes = [rich_status(domain_error_status(error)).code for error in errors]
    assert codes == [
        code_pb2.INVALID_ARGUMENT,
        code_pb2.NOT_FOUND,
        code_pb2.ALREADY_EXISTS,
        code_pb2.FAILED_PRECONDITION,
        code_pb2.UNAUTHENTICATED,
        code_pb2.PERMISSION_DENIED,
    ]


@pytest.mark.parametrize(
    "error",
    [*EVERY_KIND_OF_DOMAIN_ERROR, OutOfStock([StockShortage("p", 2, 1)])],
    ids=lambda error: type(error).__name__,
)
def test_every_domain_status_starts_with_an_error_info_of_our_domain(error: DomainError) -> None:
    first = details_of(domain_error_status(error))[0]
    assert isinstance(first, error_details_pb2.ErrorInfo)
    assert first.domain == ERROR_DOMAIN == "marketplace.example.com"
    assert first.reason


class FakeDriverError(Exception):
    """Stands in for a psycopg error: what matters is its SQLSTATE."""

    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(f"driver error {sqlstate}")
        self.sqlstate = sqlstate


RETRY_SOON = error_details_pb2.RetryInfo()
RETRY_SOON.retry_delay.FromMilliseconds(200)


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_serialization_failure_and_deadlock_are_aborted_and_retryable(sqlstate: str) -> None:
    error = DBAPIError("UPDATE products ...", {}, FakeDriverError(sqlstate))
    status = infrastructure_error_status(error)
    assert status is not None
    assert status.code is grpc.StatusCode.ABORTED
    assert details_of(status) == [error_info("TRANSACTION_CONFLICT"), RETRY_SOON]


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("SELECT 1", {}, FakeDriverError("08006")),
        InterfaceError("SELECT 1", {}, FakeDriverError(None)),
        PoolTimeoutError("QueuePool limit reached"),
        DBAPIError("SELECT 1", {}, FakeDriverError(None), connection_invalidated=True),
    ],
)
def test_lost_database_is_unavailable_and_retryable(error: BaseException) -> None:
    status = infrastructure_error_status(error)
    assert status is not None
    assert status.code is grpc.StatusCode.UNAVAILABLE
    assert details_of(status) == [error_info("DATABASE_UNAVAILABLE"), RETRY_SOON]


@pytest.mark.parametrize(
    "error",
    [
        IntegrityError("INSERT ...", {}, FakeDriverError("23505")),
        DBAPIError("SELECT 1", {}, FakeDriverError("22P02")),
        ValueError("a bug"),
        KeyError("also a bug"),
    ],
)
def test_other_failures_are_not_infrastructure(error: BaseException) -> None:
    assert infrastructure_error_status(error) is None


def test_internal_status_names_the_request_and_nothing_else() -> None:
    status = internal_status("req-42")
    assert status.code is grpc.StatusCode.INTERNAL
    assert status.details == "internal error (request id req-42)"
    assert details_of(status) == [error_info("INTERNAL", requestId="req-42")]


def test_worst_case_invalid_order_fits_in_default_grpc_metadata_limit() -> None:
    with pytest.raises(InvalidArgument) as raised:
        order_request("r-1", [("not-a-uuid", 0)] * 101)
    status = domain_error_status(raised.value)
    size = len(status.details.encode()) + sum(
        len(key) + len(value) for key, value in status.trailing_metadata
    )
    assert size < 8 * 1024
