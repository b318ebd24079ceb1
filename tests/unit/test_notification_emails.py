"""Notification emails: what each kind says in its plain-text and HTML parts, HTML escaping,
the message's shape and its Message-ID, and reading SMTP_URL."""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from marketplace.events.v1 import events_pb2
from server.domain.money import Money
from server.notifications.consumer import OrderFacts, order_email
from server.notifications.emails import (
    EmailKind,
    EmailLine,
    EmailTemplates,
    InvalidRecipient,
    OrderEmail,
    ShippedLine,
    compose_message,
    format_money,
    message_id,
)
from server.notifications.smtp import SmtpSecurity, SmtpServer, parse_smtp_url
from server.settings import Settings
from tests.conftest import JWT_SECRET

ORDER_ID = "5f0c1c2e-8d1b-4e4e-9a57-3d1f0b6c2a10"
MAIL_FROM = "Marketplace <orders@shop.example>"


def usd(amount: str) -> Money:
    return Money("USD", Decimal(amount))


def an_email(kind: EmailKind = EmailKind.ORDER_CONFIRMATION, **changes: Any) -> OrderEmail:
    email = OrderEmail(
        kind=kind,
        order_id=ORDER_ID,
        lines=(
            EmailLine("MUG-1", "Blue mug", 2, usd("12.5")),
            EmailLine("TEA-7", "Green tea", 1, usd("1234")),
        ),
        total=usd("1259"),
        pay_before=datetime(2026, 12, 5, 14, 30, tzinfo=UTC),
    )
    return dataclasses.replace(email, **changes)


@pytest.fixture(scope="module")
def templates() -> EmailTemplates:
    return EmailTemplates()


def test_the_confirmation_lists_each_line_and_the_total_in_both_parts(
    templates: EmailTemplates,
) -> None:
    rendered = templates.render(an_email())

    assert rendered.subject == "We have your order 5f0c1c2e"
    assert "2 x Blue mug (MUG-1) at USD 12.50: USD 25.00" in rendered.text
    assert "1 x Green tea (TEA-7) at USD 1,234.00: USD 1,234.00" in rendered.text
    assert "Total: USD 1,259.00" in rendered.text
    assert "Please pay by 2026-12-05 14:30 UTC" in rendered.text
    assert ORDER_ID in rendered.text
    row = (
        '<tr><td>Blue mug</td><td>MUG-1</td><td align="right">2</td>'
        '<td align="right">USD 12.50</td><td align="right">USD 25.00</td></tr>'
    )
    assert row in rendered.html
    assert '<th align="right">USD 1,259.00</th>' in rendered.html
    assert "2026-12-05 14:30 UTC" in rendered.html


@pytest.mark.parametrize(
    ("kind", "subject", "says"),
    [
        (EmailKind.PAYMENT_RECEIPT, "Receipt for your order 5f0c1c2e", "payment of USD 1,259.00"),
        (EmailKind.CANCELLATION, "Your order 5f0c1c2e is cancelled", "Your order is cancelled"),
        (EmailKind.EXPIRY, "Your order 5f0c1c2e expired unpaid", "Nothing was charged"),
        (EmailKind.REFUND, "Your refund for order 5f0c1c2e", "We have refunded USD 300.00"),
        (EmailKind.SHIPMENT, "Your order 5f0c1c2e is on its way", "(shipment SHP-9)"),
    ],
)
def test_every_kind_renders_both_parts(
    templates: EmailTemplates, kind: EmailKind, subject: str, says: str
) -> None:
    email = an_email(
        kind,
        refunded=usd("300") if kind is EmailKind.REFUND else None,
        shipment_id="SHP-9",
        shipped=(ShippedLine("MUG-1", "Blue mug", 2),),
    )

    rendered = templates.render(email)

    assert rendered.subject == subject
    assert says in rendered.text
    assert says in re.sub("<[^>]+>", "", rendered.html)  # the words, whatever the markup
    assert ORDER_ID in rendered.text
    assert ORDER_ID in rendered.html
    assert rendered.html.startswith("<!DOCTYPE html>")


def test_a_cancelled_paid_order_says_what_was_refunded(templates: EmailTemplates) -> None:
    unpaid = templates.render(an_email(EmailKind.CANCELLATION))
    paid = templates.render(an_email(EmailKind.CANCELLATION, refunded=usd("1259")))

    assert "refunded" not in unpaid.text
    assert "We have refunded USD 1,259.00" in paid.text
    assert "<strong>USD 1,259.00</strong>" in paid.html


def test_the_shipment_lists_what_the_parcel_holds(templates: EmailTemplates) -> None:
    email = an_email(
        EmailKind.SHIPMENT,
        shipment_id="SHP-9",
        shipped=(ShippedLine("MUG-1", "Blue mug", 2), ShippedLine("TEA-7", "Green tea", 1)),
    )

    rendered = templates.render(email)

    assert "  2 x Blue mug (MUG-1)\n  1 x Green tea (TEA-7)\n" in rendered.text
    assert "<li>1 x Green tea (TEA-7)</li>" in rendered.html


def test_html_escapes_a_product_name_and_plain_text_keeps_it(templates: EmailTemplates) -> None:
    name = '<script>alert("x")</script> & Co'
    email = an_email(lines=(EmailLine("EVIL-1", name, 1, usd("5")),), total=usd("5"))

    rendered = templates.render(email)

    assert "<script>" not in rendered.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; Co" in rendered.html
    assert f"1 x {name} (EVIL-1)" in rendered.text


@pytest.mark.parametrize(
    ("money", "shown"),
    [
        (Money("USD", Decimal("1234567.5")), "USD 1,234,567.50"),
        (Money("JPY", Decimal("1500")), "JPY 1,500"),
        (Money("KWD", Decimal("2.5")), "KWD 2.500"),
        (Money("USD", Decimal("10.000000000")), "USD 10.00"),
    ],
)
def test_money_is_shown_at_its_currencys_minor_unit(money: Money, shown: str) -> None:
    assert format_money(money) == shown


def test_the_message_is_multipart_alternative_with_both_parts(templates: EmailTemplates) -> None:
    rendered = templates.render(an_email())
    event_id = uuid.uuid4()

    message = compose_message(
        rendered, to="alice@example.com", mail_from=MAIL_FROM, event_id=event_id
    )

    assert message.get_content_type() == "multipart/alternative"
    assert message["To"] == "alice@example.com"
    assert message["From"] == MAIL_FROM
    assert message["Subject"] == rendered.subject
    assert message["Auto-Submitted"] == "auto-generated"
    parts = [part.get_content_type() for part in message.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    text_part = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    assert text_part is not None
    assert html_part is not None
    assert text_part.get_content() == rendered.text
    assert html_part.get_content() == rendered.html


def test_the_message_id_comes_from_the_event_so_a_second_send_is_the_same_message(
    templates: EmailTemplates,
) -> None:
    rendered = templates.render(an_email())
    event_id = uuid.UUID("0b7e4a1c-2f6d-4c3b-8a9e-5d4c3b2a1f00")

    first, second = (
        compose_message(rendered, to="alice@example.com", mail_from=MAIL_FROM, event_id=event_id)
        for _ in range(2)
    )
    other = compose_message(
        rendered, to="alice@example.com", mail_from=MAIL_FROM, event_id=uuid.uuid4()
    )

    assert first["Message-ID"] == "<0b7e4a1c-2f6d-4c3b-8a9e-5d4c3b2a1f00@shop.example>"
    assert second["Message-ID"] == first["Message-ID"]
    assert other["Message-ID"] != first["Message-ID"]


@pytest.mark.parametrize(
    "address", ["no address", "a@b@c", "alice@example.com\r\nBcc: eve@example.com"]
)
def test_an_address_no_header_can_carry_is_refused(templates: EmailTemplates, address: str) -> None:
    rendered = templates.render(an_email())
    with pytest.raises(InvalidRecipient):
        compose_message(rendered, to=address, mail_from=MAIL_FROM, event_id=uuid.uuid4())


def test_the_message_id_falls_back_to_a_reserved_domain() -> None:
    event_id = uuid.uuid4()
    assert message_id(event_id, "no address") == f"<{event_id}@marketplace.invalid>"


@pytest.mark.parametrize(
    ("url", "server"),
    [
        ("smtp://127.0.0.1:1025", SmtpServer("127.0.0.1", 1025, SmtpSecurity.NONE)),
        ("smtp://mail.example", SmtpServer("mail.example", 25, SmtpSecurity.NONE)),
        (
            "smtp+starttls://bob:secret@mail.example",
            SmtpServer("mail.example", 587, SmtpSecurity.STARTTLS, "bob", "secret"),
        ),
        (
            "smtps://bob%40shop.example:p%3Ass%2Fw@mail.example:465",
            SmtpServer("mail.example", 465, SmtpSecurity.TLS, "bob@shop.example", "p:ss/w"),
        ),
    ],
)
def test_smtp_urls_name_host_port_security_and_login(url: str, server: SmtpServer) -> None:
    parsed = parse_smtp_url(url)
    assert parsed == server
    assert parsed.password == server.password
    assert "secret" not in repr(parsed)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://mail.example", "scheme"),
        ("smtp://", "no host"),
        ("smtp://mail.example:port", "port"),
        ("smtp://mail.example/inbox", "no path"),
        ("smtp://:secret@mail.example", "without a user"),
    ],
)
def test_a_bad_smtp_url_is_refused(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_smtp_url(url)


def settings(**env: str) -> Settings:
    base: dict[str, Any] = {
        "DATABASE_URL": "postgresql://unused/db",
        "MARKETPLACE_JWT_SECRET": JWT_SECRET,
        "STRIPE_WEBHOOK_SECRET": "whsec_" + "u" * 24,
    }
    return Settings(**(base | env))


def test_notifications_are_off_without_an_smtp_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMTP_URL", raising=False)
    assert settings().smtp_url is None
    assert settings(SMTP_URL="").smtp_url is None


def test_a_bad_smtp_url_stops_the_server_without_showing_its_password() -> None:
    with pytest.raises(ValidationError, match="port") as refused:
        settings(SMTP_URL="smtps://bob:hunter2hunter2@mail.example:bad")
    assert "hunter2" not in str(refused.value)


def test_mail_from_must_be_an_address() -> None:
    with pytest.raises(ValidationError, match="MAIL_FROM"):
        settings(SMTP_URL="smtp://127.0.0.1:1025", MAIL_FROM="Marketplace")


def facts(refunded: Money | None = None) -> OrderFacts:
    email = an_email()
    return OrderFacts(
        customer_email="alice@example.com",
        lines=email.lines,
        total=email.total,
        expire_time=datetime(2026, 12, 5, 14, 30, tzinfo=UTC),
        refunded=refunded,
    )


def test_what_each_event_adds_to_the_order() -> None:
    metadata = events_pb2.EventMetadata(event_id=str(uuid.uuid4()), aggregate_id=ORDER_ID)
    created = order_email(
        EmailKind.ORDER_CONFIRMATION, ORDER_ID, facts(), events_pb2.OrderCreated()
    )
    assert created.pay_before == datetime(2026, 12, 5, 14, 30, tzinfo=UTC)
    assert created.refunded is None

    paid_then_cancelled = order_email(
        EmailKind.CANCELLATION, ORDER_ID, facts(usd("1259")), events_pb2.OrderCancelled()
    )
    assert paid_then_cancelled.refunded == usd("1259")
    assert paid_then_cancelled.pay_before is None

    refunded_event = events_pb2.OrderRefunded(metadata=metadata)
    refunded_event.amount_refunded.currency_code = "USD"
    refunded_event.amount_refunded.units = 300
    from_payments = order_email(EmailKind.REFUND, ORDER_ID, facts(usd("1259")), refunded_event)
    assert from_payments.refunded == usd("1259")
    assert order_email(EmailKind.REFUND, ORDER_ID, facts(), refunded_event).refunded == usd("300")

    shipped = events_pb2.OrderShipped(
        metadata=metadata,
        shipment_id="SHP-9",
        lines=[
            events_pb2.ShippedLine(sku="TEA-7", quantity=1),
            events_pb2.ShippedLine(sku="GONE-1", quantity=4),
        ],
    )
    shipment = order_email(EmailKind.SHIPMENT, ORDER_ID, facts(), shipped)
    assert shipment.shipment_id == "SHP-9"
    # By the order's product name; a SKU the order does not show stands for itself.
    assert shipment.shipped == (
        ShippedLine("TEA-7", "Green tea", 1),
        ShippedLine("GONE-1", "GONE-1", 4),
    )
