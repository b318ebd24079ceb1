"""The notifications consumer's handler on a real PostgreSQL and the development stack's real
SMTP sink (aiosmtpd), fed the events the use cases wrote to the outbox; NATS is left out
here (tests/e2e/test_notifications.py runs the whole way)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import psycopg
import pytest
from aiosmtpd.controller import Controller
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from devstack.mail import KeptMessage, MailFolder, kept_messages, mail_sink_in_thread
from devstack.processes import free_port
from marketplace.events.v1 import events_pb2
from server.db.engine import libpq_url
from server.domain.identity import Principal, Role
from server.domain.orders import cancel_request, order_request
from server.events.consumers import (
    EVENT_TYPE_HEADER,
    MSG_ID_HEADER,
    Delivery,
    Inbox,
    Unprocessable,
)
from server.events.registry import ConsumerContext, consumer_specs
from server.notifications.consumer import CONSUMER_NAME, NotificationMetrics, Notifier
from server.notifications.emails import EmailTemplates
from server.notifications.smtp import SmtpSecurity, SmtpSender, SmtpServer
from server.observability import Metrics
from server.services.use_cases import UseCases
from server.settings import Settings
from tests.conftest import JWT_SECRET, insert_product

pytestmark = pytest.mark.integration

MAIL_FROM = "Marketplace <orders@shop.example>"


@pytest.fixture
def sink_port() -> int:
    return free_port()


@pytest.fixture
def mail_dir(tmp_path: Path, sink_port: int) -> Iterator[Path]:
    """The SMTP sink make run starts, on `sink_port`, keeping messages in the folder."""
    folder = tmp_path / "mail"
    with mail_sink_in_thread(sink_port, folder):
        yield folder


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> NotificationMetrics:
    return NotificationMetrics.create(registry)


def notifier_to(engine: AsyncEngine, port: int, metrics: NotificationMetrics) -> Notifier:
    return Notifier(
        Inbox(engine),
        SmtpSender(SmtpServer("127.0.0.1", port, SmtpSecurity.NONE), timeout_seconds=5),
        mail_from=MAIL_FROM,
        templates=EmailTemplates(),
        metrics=metrics,
    )


@pytest.fixture
def notifier(
    engine: AsyncEngine, mail_dir: Path, sink_port: int, metrics: NotificationMetrics
) -> Notifier:
    return notifier_to(engine, sink_port, metrics)


def delivery_of(database_url: str, order_id: str, subject: str) -> Delivery:
    """The order's event on `subject` as the outbox holds it, delivered as the relay
    publishes it."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute(
            "SELECT event_id, type_name, payload FROM outbox"
            " WHERE aggregate_type = 'order' AND aggregate_id = %s AND subject = %s",
            (order_id, subject),
        ).fetchone()
    assert row is not None, f"no {subject} event for order {order_id}"
    event_id, type_name, payload = str(row[0]), row[1], bytes(row[2])
    return Delivery(
        subject=subject,
        headers={EVENT_TYPE_HEADER: type_name, MSG_ID_HEADER: event_id},
        data=payload,
        attempt=1,
        message_id=event_id,
    )


def inbox_has(database_url: str, message_id: str) -> bool:
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute(
            "SELECT 1 FROM inbox WHERE consumer = %s AND message_id = %s",
            (CONSUMER_NAME, message_id),
        ).fetchone()
    return row is not None


async def place(
    use_cases: UseCases, database_url: str, *, email: str | None, name: str = "Blue mug"
) -> str:
    """An order of 2 x 12.50 and 1 x 1,234.00 USD, placed by a customer whose token carried
    `email`."""
    mug = insert_product(database_url, stock=10, price="12.50")
    tea = insert_product(database_url, stock=10, price="1234.00")
    with psycopg.connect(libpq_url(database_url)) as conn:
        conn.execute("UPDATE products SET name = %s WHERE id = %s", (name, mug))
        conn.execute("UPDATE products SET name = 'Green tea' WHERE id = %s", (tea,))
    order = await use_cases.placement.place_order(
        f"cust-{uuid.uuid4().hex[:8]}",
        order_request(str(uuid.uuid4()), [(mug, 2), (tea, 1)]),
        customer_email=email,
    )
    return order.id


def only_message(mail_dir: Path) -> KeptMessage:
    messages = kept_messages(mail_dir)
    assert len(messages) == 1, [kept.subject for kept in messages]
    return messages[0]


def sku_of(database_url: str, order_id: str, line_no: int) -> str:
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute(
            "SELECT sku FROM order_lines WHERE order_id = %s AND line_no = %s",
            (order_id, line_no),
        ).fetchone()
    assert row is not None
    sku: str = row[0]
    return sku


async def test_the_confirmation_reaches_the_sink_with_the_lines_and_total(
    use_cases: UseCases, database_url: str, notifier: Notifier, mail_dir: Path
) -> None:
    order_id = await place(use_cases, database_url, email="alice@example.com")
    delivery = delivery_of(database_url, order_id, "marketplace.order.created")

    await notifier.handle(delivery)

    kept = only_message(mail_dir)
    assert kept.to == "alice@example.com"
    assert kept.subject == f"We have your order {order_id[:8]}"
    assert kept.message["Message-ID"] == f"<{delivery.message_id}@shop.example>"
    assert isinstance(kept.message, EmailMessage)
    assert kept.message.get_content_type() == "multipart/alternative"
    mug_sku, tea_sku = sku_of(database_url, order_id, 1), sku_of(database_url, order_id, 2)
    lines = {f"2 x Blue mug ({mug_sku})", f"1 x Green tea ({tea_sku})"}
    assert {line for line in lines if line in kept.text()} == lines
    assert "Total: USD 1,259.00" in kept.text()
    html = kept.html()
    assert html is not None
    assert "USD 1,259.00" in html
    assert inbox_has(database_url, delivery.message_id)


async def test_a_redelivered_event_sends_no_second_email(
    use_cases: UseCases, database_url: str, notifier: Notifier, mail_dir: Path
) -> None:
    order_id = await place(use_cases, database_url, email="alice@example.com")
    delivery = delivery_of(database_url, order_id, "marketplace.order.created")

    await notifier.handle(delivery)
    await notifier.handle(delivery)

    only_message(mail_dir)


async def test_an_order_without_an_address_sends_nothing_and_counts_a_skip(
    use_cases: UseCases,
    database_url: str,
    notifier: Notifier,
    mail_dir: Path,
    registry: CollectorRegistry,
) -> None:
    order_id = await place(use_cases, database_url, email=None)
    delivery = delivery_of(database_url, order_id, "marketplace.order.created")

    await notifier.handle(delivery)

    assert kept_messages(mail_dir) == []
    skipped = "marketplace_notifications_skipped_total"
    assert registry.get_sample_value(skipped, {"reason": "no_email"}) == 1
    assert inbox_has(database_url, delivery.message_id)  # decided once, not at every delivery


async def test_an_event_older_than_the_mail_age_limit_sends_nothing(
    engine: AsyncEngine,
    use_cases: UseCases,
    database_url: str,
    mail_dir: Path,
    sink_port: int,
    metrics: NotificationMetrics,
    registry: CollectorRegistry,
) -> None:
    """Switching email on later must not mail every past order still on the stream."""
    order_id = await place(use_cases, database_url, email="late@shop.example")
    delivery = delivery_of(database_url, order_id, "marketplace.order.created")
    a_day_later = Notifier(
        Inbox(engine),
        SmtpSender(SmtpServer("127.0.0.1", sink_port, SmtpSecurity.NONE), timeout_seconds=5),
        mail_from=MAIL_FROM,
        templates=EmailTemplates(),
        metrics=metrics,
        max_event_age_seconds=3600,
        clock=lambda: time.time() + 3601,
    )

    await a_day_later.handle(delivery)

    assert kept_messages(mail_dir) == []
    skipped = "marketplace_notifications_skipped_total"
    assert registry.get_sample_value(skipped, {"reason": "stale"}) == 1


async def test_a_product_name_with_markup_is_escaped_in_the_html_part(
    use_cases: UseCases, database_url: str, notifier: Notifier, mail_dir: Path
) -> None:
    name = "<script>alert(1)</script>"
    order_id = await place(use_cases, database_url, email="alice@example.com", name=name)

    await notifier.handle(delivery_of(database_url, order_id, "marketplace.order.created"))

    kept = only_message(mail_dir)
    html = kept.html()
    assert html is not None
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert f"2 x {name}" in kept.text()


async def test_smtp_down_raises_for_a_retry_and_leaves_the_event_unapplied(
    use_cases: UseCases,
    database_url: str,
    engine: AsyncEngine,
    notifier: Notifier,
    mail_dir: Path,
    registry: CollectorRegistry,
    metrics: NotificationMetrics,
) -> None:
    order_id = await place(use_cases, database_url, email="alice@example.com")
    delivery = delivery_of(database_url, order_id, "marketplace.order.created")
    nobody_listens = notifier_to(engine, free_port(), metrics)

    with pytest.raises(aiosmtplib.SMTPConnectError):
        await nobody_listens.handle(delivery)

    assert not inbox_has(database_url, delivery.message_id)
    assert registry.get_sample_value(
        "marketplace_notifications_failed_total", {"kind": "order_confirmation"}
    )
    await notifier.handle(delivery)  # the retry, with the server back
    assert only_message(mail_dir).subject == f"We have your order {order_id[:8]}"
    assert registry.get_sample_value(
        "marketplace_notifications_sent_total", {"kind": "order_confirmation"}
    )


async def test_a_cancellation_is_emailed(
    use_cases: UseCases, database_url: str, notifier: Notifier, mail_dir: Path
) -> None:
    order_id = await place(use_cases, database_url, email="alice@example.com")
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute("SELECT customer_id FROM orders WHERE id = %s", (order_id,)).fetchone()
    assert row is not None
    owner = Principal(row[0], frozenset({Role.CUSTOMER}))
    await use_cases.cancellation.cancel_order(owner, cancel_request(order_id, "cancel-1"))

    await notifier.handle(delivery_of(database_url, order_id, "marketplace.order.cancelled"))

    kept = only_message(mail_dir)
    assert kept.subject == f"Your order {order_id[:8]} is cancelled"
    assert "Your order is cancelled." in kept.text()
    assert "refunded" not in kept.text()


async def test_an_event_of_the_wrong_type_or_an_unknown_order_is_unprocessable(
    use_cases: UseCases, database_url: str, notifier: Notifier, mail_dir: Path
) -> None:
    order_id = await place(use_cases, database_url, email="alice@example.com")
    created = delivery_of(database_url, order_id, "marketplace.order.created")
    mislabelled = Delivery(
        subject=created.subject,
        headers={**created.headers, EVENT_TYPE_HEADER: "marketplace.events.v1.OrderPaid"},
        data=created.data,
        attempt=1,
        message_id=str(uuid.uuid4()),
    )
    with pytest.raises(Unprocessable, match=r"expected 'marketplace\.events\.v1\.OrderCreated'"):
        await notifier.handle(mislabelled)

    # An event naming an order this database never had (another environment's, say).
    event = events_pb2.OrderCreated.FromString(created.data)
    event.metadata.aggregate_id = event.order_id = str(uuid.uuid4())
    stranger = dataclasses.replace(
        created, data=event.SerializeToString(), message_id=str(uuid.uuid4())
    )
    with pytest.raises(Unprocessable, match="no order"):
        await notifier.handle(stranger)
    assert kept_messages(mail_dir) == []


def test_the_consumer_is_registered_only_with_an_smtp_url(
    engine: AsyncEngine, use_cases: UseCases
) -> None:
    def context(**env: str) -> ConsumerContext:
        settings = Settings(
            DATABASE_URL="postgresql://unused/db",
            MARKETPLACE_JWT_SECRET=JWT_SECRET,
            STRIPE_WEBHOOK_SECRET="whsec_" + "u" * 24,
            **env,
        )
        return ConsumerContext(settings, engine, Inbox(engine), use_cases, Metrics.create())

    assert CONSUMER_NAME not in {spec.name for spec in consumer_specs(context(SMTP_URL=""))}
    [spec] = [
        spec
        for spec in consumer_specs(context(SMTP_URL="smtp://127.0.0.1:1025"))
        if spec.name == CONSUMER_NAME
    ]
    assert spec.stream == "MARKETPLACE"
    assert sorted(spec.filter_subjects) == [
        f"marketplace.order.{event}"
        for event in ("cancelled", "created", "expired", "paid", "refunded", "shipped")
    ]


async def test_a_shipment_lists_what_the_parcel_holds_by_name(
    use_cases: UseCases, database_url: str, notifier: Notifier, mail_dir: Path
) -> None:
    order_id = await place(use_cases, database_url, email="alice@example.com")
    mug_sku = sku_of(database_url, order_id, 1)
    event_id = str(uuid.uuid4())
    # As the warehouse consumer writes it (the order need not be paid for the email).
    shipped = events_pb2.OrderShipped(
        metadata=events_pb2.EventMetadata(
            event_id=event_id, event_type="order.shipped", aggregate_id=order_id, sequence=2
        ),
        order_id=order_id,
        shipment_id="SHP-1",
        lines=[events_pb2.ShippedLine(sku=mug_sku, quantity=2)],
    )
    delivery = Delivery(
        subject="marketplace.order.shipped",
        headers={
            EVENT_TYPE_HEADER: events_pb2.OrderShipped.DESCRIPTOR.full_name,
            MSG_ID_HEADER: event_id,
        },
        data=shipped.SerializeToString(),
        attempt=1,
        message_id=event_id,
    )

    await notifier.handle(delivery)

    kept = only_message(mail_dir)
    assert kept.subject == f"Your order {order_id[:8]} is on its way"
    assert "(shipment SHP-1)" in kept.text()
    assert f"  2 x Blue mug ({mug_sku})\n" in kept.text()
    assert "Green tea" not in kept.text()


class RefusingRecipients:
    """An SMTP server that answers RCPT TO with `reply`."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    async def handle_RCPT(
        self, server: object, session: object, envelope: object, address: str, options: object
    ) -> str:
        return self.reply


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        ("451 4.3.0 mailbox busy, try again later", aiosmtplib.SMTPRecipientsRefused),
        ("550 5.1.1 no such user", Unprocessable),
    ],
)
async def test_a_refused_recipient_is_retried_unless_the_refusal_is_permanent(
    use_cases: UseCases,
    database_url: str,
    engine: AsyncEngine,
    metrics: NotificationMetrics,
    reply: str,
    outcome: type[Exception],
) -> None:
    order_id = await place(use_cases, database_url, email="alice@example.com")
    delivery = delivery_of(database_url, order_id, "marketplace.order.created")
    port = free_port()
    controller = Controller(RefusingRecipients(reply), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with pytest.raises(outcome):
            await notifier_to(engine, port, metrics).handle(delivery)
    finally:
        controller.stop()
    assert not inbox_has(database_url, delivery.message_id)


class PeerRecordingFolder(MailFolder):
    """The sink, noting which client connection (address, port) brought each message."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.peers: list[object] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.peers.append(session.peer)
        return await super().handle_DATA(server, session, envelope)


def plain_message(n: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = MAIL_FROM
    message["To"] = "alice@example.com"
    message["Subject"] = f"message {n}"
    message.set_content("hello")
    return message


async def test_messages_share_one_connection_which_is_made_again_after_a_server_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    sender = SmtpSender(SmtpServer("127.0.0.1", port, SmtpSecurity.NONE), timeout_seconds=5)
    first = PeerRecordingFolder(tmp_path / "first")
    controller = Controller(first, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        for n in range(3):
            await sender.send(plain_message(n))
    finally:
        controller.stop()
    assert len(first.peers) == 3
    assert len(set(first.peers)) == 1, first.peers  # one connection brought all three

    # The server went away with the connection still held open here: the next message
    # notices and goes over a new one.
    second = PeerRecordingFolder(tmp_path / "second")
    controller = Controller(second, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        await sender.send(plain_message(3))
        await sender.aclose()
    finally:
        controller.stop()
    assert [kept.subject for kept in kept_messages(tmp_path / "second")] == ["message 3"]
