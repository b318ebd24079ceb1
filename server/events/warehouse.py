"""The warehouse's two consumers: stock levels and shipments from stream WAREHOUSE, read as
JSON in protobuf's JSON mapping (protos/marketplace/warehouse/v1), applied once each by
server/services/warehouse.py in the inbox row's transaction. A message that can never apply
(WarehouseMessageRefused) is Unprocessable: dead-lettered with its reason at once."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from google.protobuf import json_format

from marketplace.warehouse.v1 import warehouse_pb2
from server.domain.inventory import (
    Shipment,
    StockLevel,
    WarehouseMessageRefused,
    shipment,
    stock_level,
)
from server.events.consumers import ConsumerSpec, Delivery, Unprocessable
from server.events.nats import WAREHOUSE_STREAM

if TYPE_CHECKING:  # the registry imports this module
    from server.events.registry import ConsumerContext

STOCK_LEVELS_SUBJECT = "warehouse.stock_levels"
SHIPMENTS_SUBJECT = "warehouse.shipments"
STOCK_LEVELS_CONSUMER = "warehouse-stock-levels"
SHIPMENTS_CONSUMER = "warehouse-shipments"


def parse_stock_level(data: bytes) -> StockLevel:
    """A `warehouse.stock_levels` message; WarehouseMessageRefused when it is not one."""
    message = _parse(data, warehouse_pb2.StockLevel())
    return stock_level(
        sku=message.sku,
        warehouse=message.warehouse,
        on_hand=message.on_hand,
        version=message.version,
    )


def parse_shipment(data: bytes) -> Shipment:
    """A `warehouse.shipments` message; WarehouseMessageRefused when it is not one."""
    message = _parse(data, warehouse_pb2.Shipment())
    return shipment(
        shipment_id=message.shipment_id,
        order_id=message.order_id,
        warehouse=message.warehouse,
        lines=[(line.sku, line.quantity, line.level_version) for line in message.lines],
    )


Message = TypeVar("Message", warehouse_pb2.StockLevel, warehouse_pb2.Shipment)


def _parse(data: bytes, message: Message) -> Message:
    try:
        # Unknown fields refused (ignore_unknown_fields=False): a field we cannot read may
        # change what the message means.
        return json_format.Parse(data.decode("utf-8"), message, ignore_unknown_fields=False)
    except (json_format.ParseError, UnicodeDecodeError, RecursionError) as error:
        raise WarehouseMessageRefused(f"not a {message.DESCRIPTOR.name} in JSON: {error}") from None


def stock_levels_consumer(context: ConsumerContext) -> ConsumerSpec:
    async def handle(delivery: Delivery) -> None:
        try:
            level = parse_stock_level(delivery.data)
            # Keyed by content, not by NATS message id: a level the warehouse sends twice is
            # one level.
            async with context.inbox.once(STOCK_LEVELS_CONSUMER, level.message_id) as conn:
                if conn is None:
                    return
                applied = await context.use_cases.warehouse.apply_stock_level(conn, level)
        except WarehouseMessageRefused as refused:
            raise Unprocessable(refused.reason) from None
        context.products_changed(applied.products)

    return ConsumerSpec(
        name=STOCK_LEVELS_CONSUMER,
        stream=WAREHOUSE_STREAM,
        filter_subjects=(STOCK_LEVELS_SUBJECT,),
        handle=handle,
    )


def shipments_consumer(context: ConsumerContext) -> ConsumerSpec:
    async def handle(delivery: Delivery) -> None:
        try:
            shipped = parse_shipment(delivery.data)
            async with context.inbox.once(SHIPMENTS_CONSUMER, shipped.shipment_id) as conn:
                if conn is None:
                    return
                applied = await context.use_cases.warehouse.apply_shipment(conn, shipped)
        except WarehouseMessageRefused as refused:
            raise Unprocessable(refused.reason) from None
        context.products_changed(applied.products)

    return ConsumerSpec(
        name=SHIPMENTS_CONSUMER,
        stream=WAREHOUSE_STREAM,
        filter_subjects=(SHIPMENTS_SUBJECT,),
        handle=handle,
    )
