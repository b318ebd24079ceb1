"""OrderService: translation between protobuf and the order use cases."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from marketplace.order.v1 import order_pb2, order_pb2_grpc
from server.api import convert
from server.api.context import current_principal
from server.domain import orders as rules
from server.domain.identity import Principal
from server.domain.orders import Order, OrderRequest
from server.domain.pagination import page_size
from server.domain.validation import Violations, check_request_id, parse_resource_id
from server.observability import Metrics
from server.services.orders import Orders

# Places one customer's order; in the server this is the group committer's submit.
PlaceOrder = Callable[[tuple[str, OrderRequest]], Awaitable[Order]]
# Cancels an order (a paid one is refunded first): the payments use case.
CancelOrder = Callable[[Principal, str, str], Awaitable[Order]]

Context = grpc.aio.ServicerContext[Any, Any]


class OrderServicer(order_pb2_grpc.OrderServiceServicer):
    def __init__(
        self,
        orders: Orders,
        place_order: PlaceOrder,
        cancel_order: CancelOrder,
        metrics: Metrics,
    ) -> None:
        self._orders = orders
        self._place_order = place_order
        self._cancel_order = cancel_order
        self._metrics = metrics

    async def CreateOrder(
        self, request: order_pb2.CreateOrderRequest, context: Context
    ) -> order_pb2.CreateOrderResponse:
        order_request = rules.order_request(
            request.request_id, [(item.product_id, item.quantity) for item in request.items]
        )
        order = await self._place_order((current_principal().subject, order_request))
        self._metrics.orders_placed.inc()
        return order_pb2.CreateOrderResponse(order=convert.order(order))

    async def GetOrder(
        self, request: order_pb2.GetOrderRequest, context: Context
    ) -> order_pb2.GetOrderResponse:
        order = await self._orders.get_order(
            current_principal(), parse_resource_id("id", request.id)
        )
        return order_pb2.GetOrderResponse(order=convert.order(order))

    async def ListOrders(
        self, request: order_pb2.ListOrdersRequest, context: Context
    ) -> order_pb2.ListOrdersResponse:
        orders, next_token = await self._orders.list_orders(
            current_principal(), page_size(request.page_size), request.page_token
        )
        return order_pb2.ListOrdersResponse(
            orders=[convert.order(o) for o in orders], next_page_token=next_token
        )

    async def CancelOrder(
        self, request: order_pb2.CancelOrderRequest, context: Context
    ) -> order_pb2.CancelOrderResponse:
        violations = Violations()
        check_request_id(violations, "request_id", request.request_id, required=False)
        violations.raise_if_any()
        order = await self._cancel_order(
            current_principal(), parse_resource_id("id", request.id), request.request_id
        )
        return order_pb2.CancelOrderResponse(order=convert.order(order))
