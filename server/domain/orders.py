"""Orders: what a valid order request is, what an order costs, how its status may move."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from server.domain.errors import (
    DomainError,
    ErrorReason,
    FailedPrecondition,
    NotFound,
    OutOfStock,
    PreconditionViolation,
    StockShortage,
)
from server.domain.money import Money
from server.domain.validation import Violations, check_request_id, check_resource_id

MAX_LINES = 100
MAX_QUANTITY = 1_000


class OrderStatus(enum.StrEnum):
    PENDING_PAYMENT = "PENDING_PAYMENT"
    PAID = "PAID"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    REFUNDED = "REFUNDED"
    SHIPPED = "SHIPPED"  # the warehouse shipped every line it manages


@dataclass(frozen=True, slots=True)
class LineRequest:
    product_id: str
    quantity: int


@dataclass(frozen=True, slots=True)
class OrderRequest:
    request_id: str
    lines: tuple[LineRequest, ...]

    def fingerprint(self) -> str:
        """Identifies the request's content; line order does not change what is bought."""
        canonical = ";".join(
            f"{line.product_id}x{line.quantity}" for line in self.lines_in_lock_order()
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def lines_in_lock_order(self) -> list[LineRequest]:
        """Ascending product id: every transaction locks rows in one global order, so two
        orders over the same products can never wait on each other in a cycle."""
        return sorted(self.lines, key=lambda line: line.product_id)


def order_request(request_id: str, items: Sequence[tuple[str, int]]) -> OrderRequest:
    """Validates a CreateOrder request; `items` are (product_id, quantity) pairs."""
    violations = Violations()
    check_request_id(violations, "request_id", request_id, required=True)
    if not items:
        violations.add("items", "needs at least one line")
    elif len(items) > MAX_LINES:
        violations.add("items", f"must have at most {MAX_LINES} lines (got {len(items)})")
    lines: list[LineRequest] = []
    seen: dict[str, int] = {}
    for index, (raw_product_id, quantity) in enumerate(items[: MAX_LINES + 1]):
        field = f"items[{index}]"
        product_id = check_resource_id(violations, f"{field}.product_id", raw_product_id)
        if not 1 <= quantity <= MAX_QUANTITY:
            violations.add(f"{field}.quantity", f"must be between 1 and {MAX_QUANTITY:,}")
        if product_id is None:
            continue
        if product_id in seen:
            violations.add(
                f"{field}.product_id",
                f"repeats items[{seen[product_id]}]; order a product once with a larger quantity",
            )
        seen.setdefault(product_id, index)
        lines.append(LineRequest(product_id, quantity))
    violations.raise_if_any()
    return OrderRequest(request_id, tuple(lines))


@dataclass(frozen=True, slots=True)
class OrderLine:
    product_id: str
    sku: str
    quantity: int
    unit_price: Money

    @property
    def line_total(self) -> Money:
        return self.unit_price.times(self.quantity)


def order_total(lines: Sequence[OrderLine]) -> Money:
    """The sum of the line totals; an order is paid in one currency."""
    currencies = sorted({line.unit_price.currency for line in lines})
    if len(currencies) > 1:
        raise FailedPrecondition(
            f"an order is paid in one currency; these products are priced in {currencies}",
            reason=ErrorReason.MIXED_CURRENCIES,
            metadata={"currencies": ",".join(currencies)},
            violations=[
                PreconditionViolation(
                    ErrorReason.MIXED_CURRENCIES,
                    f"products/{line.product_id}",
                    f"priced in {line.unit_price.currency}",
                )
                for line in lines
            ],
        )
    return Money(currencies[0], sum((line.line_total.amount for line in lines), Decimal(0)))


@dataclass(frozen=True, slots=True)
class ProductStock:
    """What an order needs to know of a product whose row it has locked."""

    sku: str
    price: Money
    stock: int


@dataclass(frozen=True, slots=True)
class Allocation:
    """An order that fits: its priced lines (in request order) and its total."""

    lines: tuple[OrderLine, ...]
    total: Money


def allocate(
    requests: Sequence[OrderRequest], products: Mapping[str, ProductStock]
) -> tuple[list[Allocation | DomainError], dict[str, int]]:
    """Decides, in arrival order, which of several orders the locked stock can fill.

    Each order is all or nothing: it takes every line or none, so one short order never
    takes stock from a later one that fits. Returns one outcome per request and the units
    taken per product.
    """
    remaining = {product_id: product.stock for product_id, product in products.items()}
    taken: dict[str, int] = {}
    outcomes: list[Allocation | DomainError] = []
    for request in requests:
        unknown = [line.product_id for line in request.lines if line.product_id not in products]
        if unknown:
            outcomes.append(NotFound("product", unknown[0]))
            continue
        shortages = [
            StockShortage(line.product_id, line.quantity, remaining[line.product_id])
            for line in request.lines_in_lock_order()
            if remaining[line.product_id] < line.quantity
        ]
        if shortages:
            outcomes.append(OutOfStock(shortages))
            continue
        lines = tuple(
            OrderLine(
                line.product_id,
                products[line.product_id].sku,
                line.quantity,
                products[line.product_id].price,
            )
            for line in request.lines
        )
        try:
            total = order_total(lines)
        except FailedPrecondition as error:
            outcomes.append(error)
            continue
        for line in request.lines:
            remaining[line.product_id] -= line.quantity
            taken[line.product_id] = taken.get(line.product_id, 0) + line.quantity
        outcomes.append(Allocation(lines, total))
    return outcomes, taken


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    customer_id: str
    status: OrderStatus
    lines: tuple[OrderLine, ...]
    total: Money
    create_time: datetime
    update_time: datetime
    expire_time: datetime

    @property
    def payment_deadline(self) -> datetime | None:
        """When an unpaid order expires: while it awaits payment, and the moment it did once
        expired. A paid, cancelled or refunded order has none; its deadline is history."""
        if self.status in (OrderStatus.PENDING_PAYMENT, OrderStatus.EXPIRED):
            return self.expire_time
        return None


class OrderEvent(enum.StrEnum):
    """What can happen to an order after it is placed."""

    PAYMENT_SUCCEEDED = "PAYMENT_SUCCEEDED"
    PAYMENT_WINDOW_CLOSED = "PAYMENT_WINDOW_CLOSED"
    CANCELLED = "CANCELLED"
    REFUNDED_IN_FULL = "REFUNDED_IN_FULL"
    SHIPPED = "SHIPPED"


# The order lifecycle. Anything not listed is refused. A cancel of a PAID order is only
# applied once its payment has been refunded (see cancellation()).
_TRANSITIONS: dict[tuple[OrderStatus, OrderEvent], OrderStatus] = {
    (OrderStatus.PENDING_PAYMENT, OrderEvent.PAYMENT_SUCCEEDED): OrderStatus.PAID,
    (OrderStatus.PENDING_PAYMENT, OrderEvent.PAYMENT_WINDOW_CLOSED): OrderStatus.EXPIRED,
    (OrderStatus.PENDING_PAYMENT, OrderEvent.CANCELLED): OrderStatus.CANCELLED,
    (OrderStatus.PAID, OrderEvent.CANCELLED): OrderStatus.CANCELLED,
    (OrderStatus.PAID, OrderEvent.REFUNDED_IN_FULL): OrderStatus.REFUNDED,
    (OrderStatus.PAID, OrderEvent.SHIPPED): OrderStatus.SHIPPED,
    # The goods are gone: the money can come back, the units cannot (SHIPPED holds none).
    (OrderStatus.SHIPPED, OrderEvent.REFUNDED_IN_FULL): OrderStatus.REFUNDED,
}
# Statuses in which the order holds its stock; leaving them for an end that sold nothing
# gives the stock back. SHIPPED holds none either: its units left with the shipment.
_HOLDS_STOCK = frozenset({OrderStatus.PENDING_PAYMENT, OrderStatus.PAID})
_SOLD_NOTHING = frozenset({OrderStatus.CANCELLED, OrderStatus.EXPIRED, OrderStatus.REFUNDED})


def next_status(order_id: str, current: OrderStatus, event: OrderEvent) -> OrderStatus:
    """The status `event` moves an order to, or FailedPrecondition when it cannot happen."""
    target = _TRANSITIONS.get((current, event))
    if target is None:
        raise FailedPrecondition(
            f"an order in status {current.value} cannot take {event.value}",
            reason=ErrorReason.ORDER_NOT_CANCELLABLE
            if event is OrderEvent.CANCELLED
            else ErrorReason.INVALID_ORDER_TRANSITION,
            metadata={"orderId": order_id, "status": current.value, "event": event.value},
        )
    return target


def releases_stock(current: OrderStatus, target: OrderStatus) -> bool:
    """Whether moving from `current` to `target` puts the order's units back on sale.

    Exactly once per order: only the one transition out of a stock-holding status does.
    """
    return current in _HOLDS_STOCK and target in _SOLD_NOTHING


@dataclass(frozen=True, slots=True)
class CancelRequest:
    order_id: str
    request_id: str  # optional for a cancel: "" when the caller gave none

    def refund_request_id(self) -> str:
        """The request id of the refund that cancelling a paid order starts: the caller's,
        or one derived from the order, so concurrent cancels without one share a refund."""
        return self.request_id or automatic_cancel_request_id(self.order_id)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"cancel;{self.order_id}".encode()).hexdigest()


def automatic_cancel_request_id(order_id: str) -> str:
    return f"cancel:{order_id}"


def cancel_request(order_id: str, request_id: str) -> CancelRequest:
    """Validates a CancelOrder request."""
    violations = Violations()
    canonical_id = check_resource_id(violations, "id", order_id)
    check_request_id(violations, "request_id", request_id, required=False)
    violations.raise_if_any()
    assert canonical_id is not None
    return CancelRequest(canonical_id, request_id)


class Cancellation(enum.Enum):
    """What cancelling an order in a given status takes."""

    NOTHING = "nothing"  # already cancelled: a retry is harmless
    RELEASE_NOW = "release_now"  # pending: cancel and release stock in one transaction
    REFUND_FIRST = "refund_first"  # paid: refund through the provider, then cancel


def cancellation(order_id: str, status: OrderStatus) -> Cancellation:
    if status is OrderStatus.CANCELLED:
        return Cancellation.NOTHING
    next_status(order_id, status, OrderEvent.CANCELLED)  # refuses what cannot be cancelled
    if status is OrderStatus.PAID:
        return Cancellation.REFUND_FIRST
    return Cancellation.RELEASE_NOW


def check_payable(order_id: str, status: OrderStatus, expire_time: datetime, now: datetime) -> None:
    """A payment may start only for a pending order whose payment window is open."""
    if status is OrderStatus.PENDING_PAYMENT and now < expire_time:
        return
    shown = status.value if status is not OrderStatus.PENDING_PAYMENT else "EXPIRED"
    raise FailedPrecondition(
        f"order {order_id} cannot be paid: it is {shown}",
        reason=ErrorReason.ORDER_NOT_PAYABLE,
        metadata={"orderId": order_id, "status": shown},
    )
