"""The async Marketplace client: one method per RPC, plain Python arguments."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from decimal import Decimal
from types import TracebackType
from typing import Generic, NamedTuple, Self, TypeVar

import grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from marketplace.payment.v1 import payment_pb2, payment_pb2_grpc
from marketplace_client.errors import from_rpc_error
from marketplace_client.money import to_money
from marketplace_client.retry import RetryPolicy

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ItemT = TypeVar("ItemT")

TokenSource = str | Callable[[], str]

DEFAULT_TIMEOUT_SECONDS = 10.0
# The server's default message sizes (GRPC_MAX_SEND_BYTES, GRPC_MAX_RECEIVE_BYTES): a
# channel of the client's own accepts every answer the server sends (a page of large
# products passes grpc's own 4 MiB default), and sends nothing the server would refuse.
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
)


class Page(NamedTuple, Generic[ItemT]):
    """One page of a listing; `next_page_token` is empty on the last page."""

    items: list[ItemT]
    next_page_token: str


class MarketplaceClient:
    """Async client for CatalogService, OrderService and PaymentService.

    Give it a target (``"host:port"``) to own a channel, or an existing
    ``grpc.aio.Channel`` it will leave open. Failed calls raise
    :class:`~marketplace_client.errors.MarketplaceError` subclasses.

    With a target, ``credentials`` makes the channel TLS (without them it is plaintext).
    For a server with ``TLS_CERT_FILE`` set, trust its CA; for one that also requires
    client certificates (``TLS_CLIENT_CA_FILE``), present yours::

        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path("ca.pem").read_bytes(),
            private_key=Path("client-key.pem").read_bytes(),  # mutual TLS only
            certificate_chain=Path("client.pem").read_bytes(),  # mutual TLS only
        )
        client = MarketplaceClient("api.example.com:50051", token=token, credentials=credentials)
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        token: TokenSource | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        retry: RetryPolicy | None = None,
    ) -> None:
        if isinstance(target, str):
            self._channel = (
                grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
                if credentials is not None
                else grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            )
            self._owns_channel = True
        else:
            self._channel = target
            self._owns_channel = False
        self._token = token
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._catalog = catalog_pb2_grpc.CatalogServiceStub(self._channel)
        self._orders = order_pb2_grpc.OrderServiceStub(self._channel)
        self._payments = payment_pb2_grpc.PaymentServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel if this client created it."""
        if self._owns_channel:
            await self._channel.close()

    # Catalog

    async def list_products_page(
        self, page_size: int = 0, page_token: str = ""
    ) -> Page[catalog_pb2.Product]:
        """One page of products ordered by SKU (`page_size` 0 means the server default)."""
        request = catalog_pb2.ListProductsRequest(page_size=page_size, page_token=page_token)
        response = await self._call(self._catalog.ListProducts, request)
        return Page(list(response.products), response.next_page_token)

    def list_products(self, page_size: int = 0) -> AsyncIterator[catalog_pb2.Product]:
        """Every product ordered by SKU, fetching pages as the iteration needs them."""
        return follow_pages(self.list_products_page, page_size)

    async def get_product(self, product_id: str) -> catalog_pb2.Product:
        request = catalog_pb2.GetProductRequest(id=product_id)
        return (await self._call(self._catalog.GetProduct, request)).product

    async def create_product(
        self,
        *,
        sku: str,
        name: str,
        price: Decimal | str,
        currency: str,
        description: str = "",
        stock: int = 0,
        inventory_source: catalog_pb2.InventorySource.ValueType = (
            catalog_pb2.INVENTORY_SOURCE_MANAGED_HERE
        ),
    ) -> catalog_pb2.Product:
        """Creates a product (admin only); a taken SKU raises AlreadyExistsError. With
        ``inventory_source=INVENTORY_SOURCE_WAREHOUSE`` the warehouse counts its stock
        (``stock`` must then be 0)."""
        product = catalog_pb2.Product(
            sku=sku,
            name=name,
            description=description,
            price=to_money(price, currency),
            stock=stock,
            inventory_source=inventory_source,
        )
        request = catalog_pb2.CreateProductRequest(product=product)
        return (await self._call(self._catalog.CreateProduct, request)).product

    async def update_product(
        self,
        product_id: str,
        *,
        sku: str | None = None,
        name: str | None = None,
        description: str | None = None,
        price: Decimal | str | None = None,
        currency: str | None = None,
        inventory_source: catalog_pb2.InventorySource.ValueType | None = None,
    ) -> catalog_pb2.Product:
        """Changes only the given fields (admin only); `price` and `currency` go together.
        Moving a product to INVENTORY_SOURCE_WAREHOUSE sets its stock from the warehouse's
        levels at once; back to INVENTORY_SOURCE_MANAGED_HERE keeps it for adjust_stock."""
        if (price is None) != (currency is None):
            raise ValueError("price and currency must be given together")
        product = catalog_pb2.Product(id=product_id)
        paths: list[str] = []
        if sku is not None:
            product.sku = sku
            paths.append("sku")
        if name is not None:
            product.name = name
            paths.append("name")
        if description is not None:
            product.description = description
            paths.append("description")
        if price is not None and currency is not None:
            product.price.CopyFrom(to_money(price, currency))
            paths.append("price")
        if inventory_source is not None:
            product.inventory_source = inventory_source
            paths.append("inventory_source")
        if not paths:
            # An empty mask means "every populated field" (AIP-134), which here is none.
            raise ValueError("give at least one field to update")
        request = catalog_pb2.UpdateProductRequest(
            product=product, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return (await self._call(self._catalog.UpdateProduct, request)).product

    async def adjust_stock(
        self, product_id: str, delta: int, reason: str, request_id: str | None = None
    ) -> catalog_pb2.Product:
        """Adds `delta` units (negative removes; admin only). Idempotent by `request_id`.
        A warehouse-managed product raises StockManagedByWarehouseError."""
        request = catalog_pb2.AdjustStockRequest(
            id=product_id, delta=delta, reason=reason, request_id=request_id or _new_request_id()
        )
        return (await self._call(self._catalog.AdjustStock, request)).product

    # Orders

    async def create_order(
        self, items: Sequence[tuple[str, int]], request_id: str | None = None
    ) -> order_pb2.Order:
        """Places an order of (product_id, quantity) lines. Idempotent by `request_id`."""
        request = order_pb2.CreateOrderRequest(
            request_id=request_id or _new_request_id(),
            items=[
                order_pb2.OrderItem(product_id=product_id, quantity=quantity)
                for product_id, quantity in items
            ],
        )
        return (await self._call(self._orders.CreateOrder, request)).order

    async def get_order(self, order_id: str) -> order_pb2.Order:
        request = order_pb2.GetOrderRequest(id=order_id)
        return (await self._call(self._orders.GetOrder, request)).order

    async def list_orders_page(
        self, page_size: int = 0, page_token: str = ""
    ) -> Page[order_pb2.Order]:
        """One page of the caller's orders (all orders for an admin), newest first."""
        request = order_pb2.ListOrdersRequest(page_size=page_size, page_token=page_token)
        response = await self._call(self._orders.ListOrders, request)
        return Page(list(response.orders), response.next_page_token)

    def list_orders(self, page_size: int = 0) -> AsyncIterator[order_pb2.Order]:
        """Every order the caller may see, newest first, fetching pages as needed."""
        return follow_pages(self.list_orders_page, page_size)

    async def cancel_order(self, order_id: str, request_id: str | None = None) -> order_pb2.Order:
        """Cancels an order (a paid one is refunded first); cancelling a cancelled order
        returns it unchanged."""
        request = order_pb2.CancelOrderRequest(
            id=order_id, request_id=request_id or _new_request_id()
        )
        return (await self._call(self._orders.CancelOrder, request)).order

    # Payments

    async def create_payment(
        self, order_id: str, payment_method: str, request_id: str | None = None
    ) -> payment_pb2.Payment:
        """Pays an order with a provider payment method id (`pm_...`, created on the
        client side). A decline returns the payment FAILED; an outcome the provider did not
        report in time returns it PENDING. Idempotent by `request_id`: retries of an
        unavailable provider reuse it, so the order is never charged twice."""
        request = payment_pb2.CreatePaymentRequest(
            order_id=order_id,
            payment_method=payment_method,
            request_id=request_id or _new_request_id(),
        )
        return (await self._call(self._payments.CreatePayment, request)).payment

    async def get_payment(self, payment_id: str) -> payment_pb2.Payment:
        request = payment_pb2.GetPaymentRequest(id=payment_id)
        return (await self._call(self._payments.GetPayment, request)).payment

    async def list_payments_page(
        self, order_id: str, page_size: int = 0, page_token: str = ""
    ) -> Page[payment_pb2.Payment]:
        """One page of an order's payments, newest first."""
        request = payment_pb2.ListPaymentsRequest(
            order_id=order_id, page_size=page_size, page_token=page_token
        )
        response = await self._call(self._payments.ListPayments, request)
        return Page(list(response.payments), response.next_page_token)

    def list_payments(
        self, order_id: str, page_size: int = 0
    ) -> AsyncIterator[payment_pb2.Payment]:
        """Every payment of an order, newest first, fetching pages as needed."""

        async def fetch(size: int, token: str) -> Page[payment_pb2.Payment]:
            return await self.list_payments_page(order_id, size, token)

        return follow_pages(fetch, page_size)

    async def refund_payment(
        self,
        payment_id: str,
        *,
        amount: Decimal | str | None = None,
        currency: str | None = None,
        reason: str = "",
        request_id: str | None = None,
        outside_provider: bool = False,
    ) -> payment_pb2.Payment:
        """Refunds `amount` (everything left when omitted; admin only).

        `outside_provider=True` records a refund the admin settled outside the payment
        provider, for a payment the provider has no record of (the server refused the normal
        refund with PAYMENT_UNKNOWN_TO_PROVIDER); the server refuses it while the provider
        knows the payment (PAYMENT_KNOWN_TO_PROVIDER)."""
        if (amount is None) != (currency is None):
            raise ValueError("amount and currency must be given together")
        request = payment_pb2.RefundPaymentRequest(
            id=payment_id,
            reason=reason,
            request_id=request_id or _new_request_id(),
            outside_provider=outside_provider,
        )
        if amount is not None and currency is not None:
            request.amount.CopyFrom(to_money(amount, currency))
        return (await self._call(self._payments.RefundPayment, request)).payment

    # Health

    async def check_health(self, service: str = "") -> str:
        """The grpc.health.v1 status of `service` (a full service name such as
        ``marketplace.order.v1.OrderService``; "" is the whole server) by name: SERVING,
        NOT_SERVING, ... An unknown service raises NotFoundError."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._call(self._health.Check, request)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
    ) -> ResponseT:
        # The request is built once by the caller, so every attempt carries the same
        # request_id and the server applies a mutation at most once.
        async for attempt in self._retry.retrying():
            with attempt:
                try:
                    return await method(request, timeout=self._timeout, metadata=self._metadata())
                except grpc.aio.AioRpcError as error:
                    raise from_rpc_error(error) from error
        raise AssertionError("unreachable: the retry policy re-raises the last error")

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        # Read per attempt so a callable token source can refresh an expiring token.
        if self._token is None:
            return ()
        token = self._token() if callable(self._token) else self._token
        return (("authorization", f"Bearer {token}"),)


async def follow_pages(
    fetch: Callable[[int, str], Awaitable[Page[ItemT]]], page_size: int
) -> AsyncIterator[ItemT]:
    """Follows next_page_token (AIP-158) until the last page."""
    token = ""
    while True:
        page = await fetch(page_size, token)
        for item in page.items:
            yield item
        if not page.next_page_token:
            return
        token = page.next_page_token


def _new_request_id() -> str:
    return str(uuid.uuid4())
