"""OrderService: translation between protobuf and the order use cases."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from marketplace.order.v1 import order_pb2, order_pb2_grpc
from server.api import convert
from server.api.context import current_principal
from server.domain.identity import Customer
from server.domain.orders import Order, OrderRequest, cancel_request, order_request
from server.domain.pagination import page_size
from server.domain.validation import parse_resource_id
from server.services.orders.cancellation import OrderCancellation
from server.services.orders.reads import OrderReads

# Places one customer's order; in the server this is the group committer's submit, which
# runs OrderPlacement.place_orders for many callers at once.
PlaceOrder = Callable[[tuple[Customer, OrderRequest]], Awaitable[Order]]

Context = grpc.aio.ServicerContext[Any, Any]


class OrderServicer(order_pb2_grpc.OrderServiceServicer):
    def __init__(
        self, place_order: PlaceOrder, reads: OrderReads, cancellation: OrderCancellation
    ) -> None:
        self._place_order = place_order
        self._reads = reads
        self._cancellation = cancellation

    async def CreateOrder(
        self, request: order_pb2.CreateOrderRequest, context: Context
    ) -> order_pb2.CreateOrderResponse:
        new_order = order_request(
            request.request_id, [(item.product_id, item.quantity) for item in request.items]
        )
        order = await self._place_order((current_principal().customer, new_order))
        return order_pb2.CreateOrderResponse(order=convert.order(order))

    async def GetOrder(
        self, request: order_pb2.GetOrderRequest, context: Context
    ) -> order_pb2.GetOrderResponse:
        order = await self._reads.get_order(
            current_principal(), parse_resource_id("id", request.id)
        )
        return order_pb2.GetOrderResponse(order=convert.order(order))

    async def ListOrders(
        self, request: order_pb2.ListOrdersRequest, context: Context
    ) -> order_pb2.ListOrdersResponse:
        orders, next_token = await self._reads.list_orders(
            current_principal(), page_size(request.page_size), request.page_token
        )
        return order_pb2.ListOrdersResponse(
            orders=[convert.order(o) for o in orders], next_page_token=next_token
        )

    async def CancelOrder(
        self, request: order_pb2.CancelOrderRequest, context: Context
    ) -> order_pb2.CancelOrderResponse:
        order = await self._cancellation.cancel_order(
            current_principal(), cancel_request(request.id, request.request_id)
        )
        return order_pb2.CancelOrderResponse(order=convert.order(order))
