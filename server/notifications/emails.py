"""What an email about an order says, as plain data, and its rendering into a subject, a
plain-text body and an HTML body (jinja2 templates in ./templates, HTML autoescaped), then
into one multipart/alternative message. No I/O: the consumer reads, this decides the text."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

import jinja2

from server.domain.money import Money, minor_unit_exponent


class EmailKind(enum.StrEnum):
    """One email per kind of order event; the value names its two templates."""

    ORDER_CONFIRMATION = "order_confirmation"
    PAYMENT_RECEIPT = "payment_receipt"
    CANCELLATION = "cancellation"
    EXPIRY = "expiry"
    REFUND = "refund"
    SHIPMENT = "shipment"


_SUBJECTS = {
    EmailKind.ORDER_CONFIRMATION: "We have your order {order}",
    EmailKind.PAYMENT_RECEIPT: "Receipt for your order {order}",
    EmailKind.CANCELLATION: "Your order {order} is cancelled",
    EmailKind.EXPIRY: "Your order {order} expired unpaid",
    EmailKind.REFUND: "Your refund for order {order}",
    EmailKind.SHIPMENT: "Your order {order} is on its way",
}


@dataclass(frozen=True, slots=True)
class EmailLine:
    sku: str
    name: str
    quantity: int
    unit_price: Money

    @property
    def subtotal(self) -> Money:
        return self.unit_price.times(self.quantity)


@dataclass(frozen=True, slots=True)
class ShippedLine:
    sku: str
    name: str
    quantity: int


@dataclass(frozen=True, slots=True)
class OrderEmail:
    """Everything one email says. `pay_before` is the confirmation's payment deadline;
    `refunded` the money returned (a refund, or the cancellation of a paid order);
    `shipment_id` and `shipped` what a shipment carried."""

    kind: EmailKind
    order_id: str
    lines: tuple[EmailLine, ...]
    total: Money
    pay_before: datetime | None = None
    refunded: Money | None = None
    shipment_id: str | None = None
    shipped: tuple[ShippedLine, ...] = ()

    @property
    def short_order_id(self) -> str:
        """The order as a subject names it: its id's first 8 characters (a UUID's first
        group), enough for a customer to tell their orders apart."""
        return self.order_id[:8]


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def format_money(money: Money) -> str:
    """`USD 1,234.50`, `JPY 1,500`: the amount at its currency's minor unit."""
    return f"{money.currency} {money.amount:,.{minor_unit_exponent(money.currency)}f}"


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


class EmailTemplates:
    """The templates, loaded once (jinja2 caches them compiled). HTML is autoescaped, so a
    product named `<script>` arrives as text; plain text is left as written."""

    def __init__(self) -> None:
        self._environment = jinja2.Environment(
            loader=jinja2.PackageLoader("server.notifications", "templates"),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",)),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            # Templates ship with the code: no stat of every file (base, lines) per render.
            auto_reload=False,
        )
        self._environment.filters["money"] = format_money
        self._environment.filters["time"] = format_time

    def render(self, email: OrderEmail) -> RenderedEmail:
        context = {"email": email}
        return RenderedEmail(
            subject=_SUBJECTS[email.kind].format(order=email.short_order_id),
            text=self._environment.get_template(f"{email.kind}.txt").render(context),
            html=self._environment.get_template(f"{email.kind}.html").render(context),
        )


def message_id(event_id: uuid.UUID, mail_from: str) -> str:
    """The same for every send of one event's email, so a second send (after a crash
    between the send and the inbox's commit) is recognisable as a duplicate by the
    recipient's server: `<event id@the sender's domain>`."""
    _, at, domain = parseaddr(mail_from)[1].rpartition("@")
    return f"<{event_id}@{domain if at and domain else 'marketplace.invalid'}>"


class InvalidRecipient(ValueError):
    """An address the email package cannot put in a To header."""


def _recipient(address: str) -> Address:
    try:
        return Address(addr_spec=address)
    except (ValueError, HeaderParseError) as error:
        raise InvalidRecipient(f"{address!r}: {error}") from None


def compose_message(
    rendered: RenderedEmail,
    *,
    to: str,
    mail_from: str,
    event_id: uuid.UUID,
    date: datetime | None = None,
) -> EmailMessage:
    """A multipart/alternative message: the plain text first, the HTML as the richer part.
    InvalidRecipient when `to` is no address the email package can write."""
    message = EmailMessage()
    message["From"] = mail_from
    message["To"] = _recipient(to)
    message["Subject"] = rendered.subject
    message["Date"] = format_datetime(date or datetime.now(UTC))
    message["Message-ID"] = message_id(event_id, mail_from)
    # RFC 3834: an automatic message, to which vacation responders do not answer.
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message
