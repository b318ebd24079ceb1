"""MarketplaceClient's own promises against the real stack: typed rich errors, bounded
retries that reuse the request_id, token sources, and channel ownership."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from marketplace.catalog.v1 import catalog_pb2
from marketplace.order.v1 import order_pb2
from marketplace.payment.v1 import payment_pb2
from marketplace_client import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    MarketplaceClient,
    NotFoundError,
    OutOfStockError,
    PermissionDeniedError,
    RetryPolicy,
    StockManagedByWarehouseError,
    UnauthenticatedError,
    UnavailableError,
    to_decimal,
    to_money,
)
from marketplace_client.errors import from_rpc_error
from tests.conftest import Tokens, insert_product, stock_of
from tests.stack import Stack

pytestmark = pytest.mark.e2e

FAST_RETRIES = RetryPolicy(attempts=3, initial_seconds=0.01, max_seconds=0.05)

Continuation = Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]]


def failure(code: grpc.StatusCode, *details: Any) -> grpc.aio.AioRpcError:
    """A failed call as the server would send it, rich details included."""
    status = status_pb2.Status(code=code.value[0], message=f"simulated {code.name}")
    for detail in details:
        status.details.add().Pack(detail)
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, status.message)


class LoseResponses(grpc.aio.UnaryUnaryClientInterceptor):
    """Lets the first `times` calls reach the server, then fails them as if the response
    had been lost on the way back: the server committed, the client saw an error."""

    def __init__(self, code: grpc.StatusCode, times: int, *, reach_server: bool = True) -> None:
        self.code = code
        self.times = times
        self.reach_server = reach_server
        self.requests: list[Any] = []

    async def intercept_unary_unary(
        self, continuation: Continuation, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        self.requests.append(request)
        if len(self.requests) > self.times:
            return await continuation(details, request)
        if self.reach_server:
            await (await continuation(details, request))
        raise failure(self.code)


async def test_a_lost_create_order_response_is_retried_with_the_same_request_id(
    stack: Stack, tokens: Tokens
) -> None:
    product_id = insert_product(stack.database_url, stock=10)
    lose = LoseResponses(grpc.StatusCode.UNAVAILABLE, times=2)
    async with (
        grpc.aio.insecure_channel(stack.grpc_target, interceptors=[lose]) as channel,
        MarketplaceClient(
            channel, token=tokens.customer(f"retry-{uuid.uuid4()}"), retry=FAST_RETRIES
        ) as client,
    ):
        order = await client.create_order([(product_id, 3)])
        orders = [o async for o in client.list_orders()]

    sent: list[order_pb2.CreateOrderRequest] = lose.requests[:3]
    assert len(sent) == 3
    assert len({r.request_id for r in sent}) == 1
    uuid.UUID(sent[0].request_id)
    assert [o.id for o in orders] == [order.id]
    assert stock_of(stack.database_url, product_id) == 7


async def test_an_aborted_adjust_stock_is_retried_and_applied_once(
    stack: Stack, tokens: Tokens
) -> None:
    product_id = insert_product(stack.database_url, stock=1)
    lose = LoseResponses(grpc.StatusCode.ABORTED, times=1)
    async with (
        grpc.aio.insecure_channel(stack.grpc_target, interceptors=[lose]) as channel,
        MarketplaceClient(channel, token=tokens.admin(), retry=FAST_RETRIES) as client,
    ):
        product = await client.adjust_stock(product_id, 4, "delivery")

    sent: list[catalog_pb2.AdjustStockRequest] = lose.requests
    assert len(sent) == 2
    assert sent[0].request_id == sent[1].request_id
    assert product.stock == 5
    assert stock_of(stack.database_url, product_id) == 5


async def test_retries_are_bounded(stack: Stack) -> None:
    lose = LoseResponses(grpc.StatusCode.UNAVAILABLE, times=100, reach_server=False)
    async with (
        grpc.aio.insecure_channel(stack.grpc_target, interceptors=[lose]) as channel,
        MarketplaceClient(channel, retry=FAST_RETRIES) as client,
    ):
        with pytest.raises(UnavailableError):
            await client.list_products_page()
    assert len(lose.requests) == FAST_RETRIES.attempts


async def test_errors_other_than_unavailable_and_aborted_are_not_retried(stack: Stack) -> None:
    lose = LoseResponses(grpc.StatusCode.UNKNOWN, times=0)
    async with (
        grpc.aio.insecure_channel(stack.grpc_target, interceptors=[lose]) as channel,
        MarketplaceClient(channel, retry=FAST_RETRIES) as client,
    ):
        with pytest.raises(NotFoundError) as raised:
            await client.get_product(str(uuid.uuid4()))
    assert len(lose.requests) == 1
    assert raised.value.code == grpc.StatusCode.NOT_FOUND


async def test_invalid_arguments_carry_every_field_violation(
    channel: grpc.aio.Channel, tokens: Tokens
) -> None:
    client = MarketplaceClient(channel, token=tokens.admin())
    with pytest.raises(InvalidArgumentError) as raised:
        await client.create_product(sku="no spaces allowed", name="", price="1", currency="XYZ")
    violations = raised.value.field_violations
    assert {v.field for v in violations} == {"product.sku", "product.name", "product.price"}
    assert all(isinstance(v, FieldViolation) and v.description for v in violations)


async def test_taken_sku_is_already_exists(channel: grpc.aio.Channel, tokens: Tokens) -> None:
    client = MarketplaceClient(channel, token=tokens.admin())
    sku = f"DUP-{uuid.uuid4().hex[:12]}"
    await client.create_product(sku=sku, name="First", price="1", currency="USD")
    with pytest.raises(AlreadyExistsError) as raised:
        await client.create_product(sku=sku, name="Second", price="1", currency="USD")
    assert raised.value.reason == "ALREADY_EXISTS"
    assert raised.value.metadata == {"key": sku}


async def test_stock_below_zero_is_a_failed_precondition_not_out_of_stock(
    channel: grpc.aio.Channel, tokens: Tokens, stack: Stack
) -> None:
    product_id = insert_product(stack.database_url, stock=2)
    client = MarketplaceClient(channel, token=tokens.admin())
    with pytest.raises(FailedPreconditionError) as raised:
        await client.adjust_stock(product_id, -3, "stocktake")
    assert not isinstance(raised.value, OutOfStockError)
    assert raised.value.reason == "INSUFFICIENT_STOCK"
    assert raised.value.metadata == {"productId": product_id, "requested": "3", "available": "2"}
    assert len(raised.value.precondition_violations) == 1


async def test_a_warehouse_managed_product_through_the_client(
    channel: grpc.aio.Channel, tokens: Tokens
) -> None:
    client = MarketplaceClient(channel, token=tokens.admin())
    created = await client.create_product(
        sku=f"WH-{uuid.uuid4().hex[:12]}",
        name="Counted by the warehouse",
        price="4",
        currency="USD",
        inventory_source=catalog_pb2.INVENTORY_SOURCE_WAREHOUSE,
    )
    assert created.inventory_source == catalog_pb2.INVENTORY_SOURCE_WAREHOUSE
    fetched = await client.get_product(created.id)
    assert fetched.inventory_source == catalog_pb2.INVENTORY_SOURCE_WAREHOUSE
    with pytest.raises(StockManagedByWarehouseError) as raised:
        await client.adjust_stock(created.id, 5, "delivery")
    assert raised.value.metadata == {"productId": created.id}
    moved = await client.update_product(
        created.id, inventory_source=catalog_pb2.INVENTORY_SOURCE_MANAGED_HERE
    )
    assert moved.inventory_source == catalog_pb2.INVENTORY_SOURCE_MANAGED_HERE
    assert (await client.adjust_stock(created.id, 5, "delivery")).stock == 5


async def test_auth_failures_are_typed(channel: grpc.aio.Channel, tokens: Tokens) -> None:
    with pytest.raises(UnauthenticatedError) as missing:
        await MarketplaceClient(channel).list_orders_page()
    assert missing.value.reason == "MISSING_TOKEN"

    with pytest.raises(UnauthenticatedError) as expired:
        await MarketplaceClient(channel, token=tokens.expired()).list_orders_page()
    assert expired.value.reason == "TOKEN_EXPIRED"

    customer = MarketplaceClient(channel, token=tokens.customer())
    with pytest.raises(PermissionDeniedError) as denied:
        await customer.create_product(sku="NOPE", name="Nope", price="1", currency="USD")
    assert denied.value.reason == "MISSING_ROLE"
    assert denied.value.metadata == {"requiredRole": "admin"}


async def test_a_token_callable_is_asked_on_every_call(
    channel: grpc.aio.Channel, tokens: Tokens
) -> None:
    asked: list[str] = []

    def token() -> str:
        asked.append("asked")
        return tokens.customer(f"callable-{uuid.uuid4()}")

    client = MarketplaceClient(channel, token=token)
    assert await client.list_orders_page() == ([], "")
    assert await client.list_orders_page() == ([], "")
    assert len(asked) == 2


async def test_the_client_closes_only_a_channel_it_created(
    stack: Stack, channel: grpc.aio.Channel
) -> None:
    async with MarketplaceClient(channel) as borrowed:
        await borrowed.list_products_page(page_size=1)
    await MarketplaceClient(channel).list_products_page(page_size=1)

    async with MarketplaceClient(stack.grpc_target) as owner:
        await owner.list_products_page(page_size=1)
    with pytest.raises(grpc.aio.UsageError):
        await owner.list_products_page(page_size=1)


async def test_update_product_needs_a_field_and_a_price_needs_its_currency(
    channel: grpc.aio.Channel,
) -> None:
    client = MarketplaceClient(channel)
    product_id = str(uuid.uuid4())
    with pytest.raises(ValueError, match="at least one field"):
        await client.update_product(product_id)
    with pytest.raises(ValueError, match="together"):
        await client.update_product(product_id, price="1.00")


def test_retry_info_and_error_info_are_decoded() -> None:
    error = from_rpc_error(
        failure(
            grpc.StatusCode.ABORTED,
            error_details_pb2.ErrorInfo(
                reason="TRANSACTION_CONFLICT", domain="marketplace.example.com"
            ),
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=200_000_000)),
        )
    )
    assert isinstance(error, AbortedError)
    assert error.reason == "TRANSACTION_CONFLICT"
    assert error.retry_delay == timedelta(milliseconds=200)
    assert error.message == "simulated ABORTED"


def test_a_status_without_details_still_maps_to_its_code() -> None:
    bare = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connect failed"
    )
    error = from_rpc_error(bare)
    assert isinstance(error, UnavailableError)
    assert (error.message, error.reason, error.retry_delay) == ("connect failed", None, None)
    assert error.code.value[0] == code_pb2.UNAVAILABLE


@pytest.mark.parametrize(
    ("amount", "units", "nanos"),
    [("12.34", 12, 340_000_000), ("0.000000001", 0, 1), ("-1.5", -1, -500_000_000), (7, 7, 0)],
)
def test_money_round_trips_exactly(amount: str | int, units: int, nanos: int) -> None:
    money = to_money(amount, "EUR")
    assert (money.currency_code, money.units, money.nanos) == ("EUR", units, nanos)
    assert to_decimal(money) == Decimal(amount)


def test_money_refuses_to_round() -> None:
    with pytest.raises(ValueError, match="nine decimal places"):
        to_money("0.0000000001", "EUR")


async def test_payments_through_the_client(
    channel: grpc.aio.Channel, stack: Stack, tokens: Tokens, database_url: str
) -> None:
    product = insert_product(database_url, stock=10, price="7.25")
    customer = MarketplaceClient(channel, token=tokens.customer("client-payer"))
    admin = MarketplaceClient(channel, token=tokens.admin())
    order = await customer.create_order([(product, 2)])
    card = await stack.localstripe.payment_method("4242424242424242")
    payment = await customer.create_payment(order.id, card)
    assert payment.status == payment_pb2.PAYMENT_STATUS_SUCCEEDED
    assert to_decimal(payment.amount) == Decimal("14.50")
    assert [p.id async for p in customer.list_payments(order.id, page_size=1)] == [payment.id]
    with pytest.raises(PermissionDeniedError):
        await customer.refund_payment(payment.id)
    refunded = await admin.refund_payment(payment.id, amount="4.50", currency="USD", reason="dent")
    assert refunded.status == payment_pb2.PAYMENT_STATUS_PARTIALLY_REFUNDED
    assert to_decimal(refunded.amount_refunded) == Decimal("4.50")
    with pytest.raises(FailedPreconditionError) as refused:
        await admin.refund_payment(payment.id, amount="10.01", currency="USD")
    assert refused.value.reason == "REFUND_EXCEEDS_PAYMENT"
    # The admin's way out for a payment the provider lost is refused while it knows this one.
    with pytest.raises(FailedPreconditionError) as known:
        await admin.refund_payment(payment.id, outside_provider=True)
    assert known.value.reason == "PAYMENT_KNOWN_TO_PROVIDER"
    with pytest.raises(FailedPreconditionError) as not_payable:
        await customer.create_payment(order.id, card)
    assert not_payable.value.reason == "ORDER_NOT_PAYABLE"
    cancelled = await customer.cancel_order(order.id)
    assert cancelled.status == order_pb2.ORDER_STATUS_CANCELLED
    assert stock_of(database_url, product) == 10
    assert (await admin.get_payment(payment.id)).status == payment_pb2.PAYMENT_STATUS_REFUNDED
