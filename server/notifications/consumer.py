"""The `notifications` consumer: one email per order event, to the address the customer's
token carried when the order was placed (orders.customer_email).

Each delivery: decode the event by its Marketplace-Event-Type header; in the inbox's
transaction, read what the email shows (the order's lines, total, address; what was
refunded), render, send; the inbox row commits after the send. So an email is sent at least
once: a crash between the send and that commit sends it again on redelivery, with the same
Message-ID (made of the event id), which lets the recipient's server recognise the
duplicate. SMTP refusing or down raises, so the message is redelivered with backoff and, at
CONSUMER_MAX_DELIVER, dead-lettered; the order itself never depends on an email.

The payment receipt comes from `order.paid`, not `payment.succeeded`: written in the same
transaction, but `order.paid` is keyed by the order, like the five other emails, and an
order is paid once, while its payments (a failed one, then a good one) are several.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import aiosmtplib
import structlog
from google.protobuf.message import DecodeError, Message
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from structlog.typing import FilteringBoundLogger

from marketplace.events.v1 import events_pb2
from server.domain.money import Money
from server.events.consumers import EVENT_TYPE_HEADER, ConsumerSpec, Delivery, Inbox, Unprocessable
from server.events.nats import MARKETPLACE_STREAM
from server.notifications.emails import (
    EmailKind,
    EmailLine,
    EmailTemplates,
    InvalidRecipient,
    OrderEmail,
    ShippedLine,
    compose_message,
)
from server.notifications.smtp import RecipientRefused, SmtpSender, parse_smtp_url

if TYPE_CHECKING:
    from server.events.registry import ConsumerContext

CONSUMER_NAME = "notifications"

_log = structlog.get_logger("marketplace.notifications")


@dataclass(frozen=True)
class _Subscription:
    kind: EmailKind
    message_type: type[Message]


# Subject -> the email it sends and the event message it carries.
SUBSCRIPTIONS = {
    "marketplace.order.created": _Subscription(
        EmailKind.ORDER_CONFIRMATION, events_pb2.OrderCreated
    ),
    "marketplace.order.paid": _Subscription(EmailKind.PAYMENT_RECEIPT, events_pb2.OrderPaid),
    "marketplace.order.cancelled": _Subscription(EmailKind.CANCELLATION, events_pb2.OrderCancelled),
    "marketplace.order.expired": _Subscription(EmailKind.EXPIRY, events_pb2.OrderExpired),
    "marketplace.order.refunded": _Subscription(EmailKind.REFUND, events_pb2.OrderRefunded),
    "marketplace.order.shipped": _Subscription(EmailKind.SHIPMENT, events_pb2.OrderShipped),
}


@dataclass(frozen=True)
class NotificationMetrics:
    sent: Counter
    failed: Counter
    skipped: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> NotificationMetrics:
        return cls(
            sent=Counter(
                "marketplace_notifications_sent_total",
                "Emails the SMTP server accepted, by kind",
                ["kind"],
                registry=registry,
            ),
            failed=Counter(
                "marketplace_notifications_failed_total",
                "Sends that failed (the SMTP server down, slow or refusing), by kind; each is"
                " retried, then dead-lettered",
                ["kind"],
                registry=registry,
            ),
            skipped=Counter(
                "marketplace_notifications_skipped_total",
                "Order events no email was sent for, by reason: no_email (the customer's token"
                " had no email claim), invalid_email, stale (the event is older than"
                " MAIL_MAX_EVENT_AGE)",
                ["reason"],
                registry=registry,
            ),
        )


@dataclass(frozen=True)
class OrderFacts:
    """What the emails show of an order, as the database has it now."""

    customer_email: str | None
    lines: tuple[EmailLine, ...]
    total: Money
    expire_time: datetime
    refunded: Money | None


_ORDER = text(
    """
    SELECT o.customer_email, o.currency, o.total, o.expire_time,
           (SELECT coalesce(sum(p.amount_refunded), 0) FROM payments p
             WHERE p.order_id = o.id) AS refunded
      FROM orders o
     WHERE o.id = :order_id
    """
)
# The product's name as it is now: order lines keep the SKU and price, not the name.
_LINES = text(
    """
    SELECT l.sku, p.name, l.quantity, l.unit_price, l.currency
      FROM order_lines l JOIN products p ON p.id = l.product_id
     WHERE l.order_id = :order_id
     ORDER BY l.line_no
    """
)


async def _load_order(conn: AsyncConnection, order_id: uuid.UUID) -> OrderFacts | None:
    row = (await conn.execute(_ORDER, {"order_id": order_id})).first()
    if row is None:
        return None
    lines = (await conn.execute(_LINES, {"order_id": order_id})).all()
    refunded: Decimal = row.refunded
    return OrderFacts(
        customer_email=row.customer_email,
        lines=tuple(
            EmailLine(line.sku, line.name, line.quantity, Money(line.currency, line.unit_price))
            for line in lines
        ),
        total=Money(row.currency, row.total),
        expire_time=row.expire_time,
        refunded=Money(row.currency, refunded) if refunded > 0 else None,
    )


def order_email(kind: EmailKind, order_id: str, facts: OrderFacts, event: Message) -> OrderEmail:
    """The email `event` sends, from what the order is now and what the event carries."""
    shipment_id: str | None = None
    shipped: tuple[ShippedLine, ...] = ()
    if isinstance(event, events_pb2.OrderShipped):
        names = {line.sku: line.name for line in facts.lines}
        shipment_id = event.shipment_id
        shipped = tuple(
            ShippedLine(line.sku, names.get(line.sku, line.sku), line.quantity)
            for line in event.lines
        )
    refunded = facts.refunded if kind in (EmailKind.REFUND, EmailKind.CANCELLATION) else None
    if isinstance(event, events_pb2.OrderRefunded) and refunded is None:
        # The payments' refunded total is the figure; the event carries the same one,
        # which stands in should no payment row show it.
        amount = event.amount_refunded
        refunded = Money.from_units_nanos(amount.currency_code, amount.units, amount.nanos)
    return OrderEmail(
        kind=kind,
        order_id=order_id,
        lines=facts.lines,
        total=facts.total,
        pay_before=facts.expire_time if kind is EmailKind.ORDER_CONFIRMATION else None,
        refunded=refunded,
        shipment_id=shipment_id,
        shipped=shipped,
    )


def _decode(delivery: Delivery) -> tuple[_Subscription, Any]:
    """The subscription the subject names and its event, or Unprocessable."""
    subscription = SUBSCRIPTIONS.get(delivery.subject)
    if subscription is None:
        raise Unprocessable(f"no email for subject {delivery.subject}")
    expected = subscription.message_type.DESCRIPTOR.full_name
    type_name = delivery.headers.get(EVENT_TYPE_HEADER)
    if type_name != expected:
        raise Unprocessable(f"{EVENT_TYPE_HEADER} is {type_name!r}, expected {expected!r}")
    event = subscription.message_type()
    try:
        event.ParseFromString(delivery.data)
    except DecodeError as error:
        raise Unprocessable(f"malformed {expected}: {error}") from None
    return subscription, event


def _ids(event: Any) -> tuple[uuid.UUID, uuid.UUID]:
    """The event id and the order id its metadata names."""
    try:
        return uuid.UUID(event.metadata.event_id), uuid.UUID(event.metadata.aggregate_id)
    except ValueError:
        raise Unprocessable(
            f"event id {event.metadata.event_id!r} or order id"
            f" {event.metadata.aggregate_id!r} is not a UUID"
        ) from None


class Notifier:
    """The consumer's handler: `handle` is what the framework calls per delivery."""

    def __init__(
        self,
        inbox: Inbox,
        sender: SmtpSender,
        *,
        mail_from: str,
        templates: EmailTemplates,
        metrics: NotificationMetrics,
        max_event_age_seconds: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_event_age_seconds = max_event_age_seconds
        self._clock = clock
        self._inbox = inbox
        self._sender = sender
        self._mail_from = mail_from
        self._templates = templates
        self._metrics = metrics

    async def handle(self, delivery: Delivery) -> None:
        subscription, event = _decode(delivery)
        event_id, order_id = _ids(event)
        kind = subscription.kind
        log = _log.bind(kind=str(kind), order_id=str(order_id), event_id=str(event_id))
        occurred = event.metadata.occur_time.ToNanoseconds() / 1e9
        if event.metadata.HasField("occur_time") and (
            self._clock() - occurred > self._max_event_age_seconds
        ):
            self._skip(log, "stale")
            return
        async with self._inbox.once(CONSUMER_NAME, delivery.message_id) as conn:
            if conn is None:
                return  # sent before: a redelivery, or a replayed dead letter
            facts = await _load_order(conn, order_id)
            if facts is None:
                raise Unprocessable(f"no order {order_id}")
            if facts.customer_email is None:
                self._skip(log, "no_email")
                return
            rendered = self._templates.render(order_email(kind, str(order_id), facts, event))
            try:
                message = compose_message(
                    rendered, to=facts.customer_email, mail_from=self._mail_from, event_id=event_id
                )
            except InvalidRecipient:
                # The token's claim was checked when the order was placed, less strictly
                # than the email package parses it. Nothing a retry could change.
                self._skip(log, "invalid_email")
                return
            await self._send(message, kind, log)

    async def _send(
        self, message: EmailMessage, kind: EmailKind, log: FilteringBoundLogger
    ) -> None:
        try:
            await self._sender.send(message)
        except RecipientRefused as refused:
            self._metrics.failed.labels(kind).inc()
            log.warning("notification_failed", error=f"recipient refused: {refused}")
            raise Unprocessable(f"the SMTP server refused the recipient: {refused}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            self._metrics.failed.labels(kind).inc()
            log.warning("notification_failed", error=f"{type(error).__name__}: {error}")
            raise
        self._metrics.sent.labels(kind).inc()
        log.info("notification_sent", message_id=message["Message-ID"])

    def _skip(self, log: FilteringBoundLogger, reason: str) -> None:
        self._metrics.skipped.labels(reason).inc()
        log.info("notification_skipped", reason=reason)


def notification_consumer(context: ConsumerContext) -> ConsumerSpec | None:
    """The consumer, or None when SMTP_URL is unset: then no email is sent at all."""
    settings = context.settings
    if settings.smtp_url is None:
        return None
    sender = SmtpSender(
        parse_smtp_url(settings.smtp_url), timeout_seconds=settings.mail_send_timeout_seconds
    )
    notifier = Notifier(
        context.inbox,
        sender,
        mail_from=settings.mail_from,
        templates=EmailTemplates(),
        metrics=NotificationMetrics.create(context.metrics.registry),
        max_event_age_seconds=settings.mail_max_event_age_seconds,
    )
    return ConsumerSpec(
        name=CONSUMER_NAME,
        stream=MARKETPLACE_STREAM,
        filter_subjects=tuple(SUBSCRIPTIONS),
        handle=notifier.handle,
    )
