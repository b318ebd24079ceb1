"""Order emails the whole way: CreateOrder on the server process, its outbox event through the
relay and a real nats-server (JetStream), the `notifications` consumer, SMTP to the
development stack's sink (aiosmtpd), and the dead-letter stream when SMTP is down."""

from __future__ import annotations

import uuid

import grpc
import pytest

from devstack.mail import KeptMessage
from marketplace.catalog.v1 import catalog_pb2
from marketplace.events.v1 import dead_letter_service_pb2, dead_letter_service_pb2_grpc, events_pb2
from marketplace.order.v1 import order_pb2
from marketplace_client import MarketplaceClient
from server.api.auth import issue_development_token
from tests.conftest import JWT_SECRET, Tokens, eventually
from tests.stack import Stack, bearer

pytestmark = pytest.mark.e2e


def customer_token(email: str | None) -> str:
    subject = f"cust-{uuid.uuid4().hex[:8]}"
    return issue_development_token(
        JWT_SECRET, subject, ["customer"], lifetime_seconds=3600, email=email
    )


async def create_product(
    channel: grpc.aio.Channel, tokens: Tokens, name: str, price: str
) -> catalog_pb2.Product:
    async with MarketplaceClient(channel, token=tokens.admin()) as admin:
        return await admin.create_product(
            sku=f"MAIL-{uuid.uuid4().hex[:8]}", name=name, price=price, currency="USD", stock=100
        )


async def place_order(
    channel: grpc.aio.Channel, token: str, lines: list[tuple[catalog_pb2.Product, int]]
) -> order_pb2.Order:
    async with MarketplaceClient(channel, token=token) as customer:
        return await customer.create_order([(product.id, quantity) for product, quantity in lines])


def mail_for(stack: Stack, order_id: str) -> list[KeptMessage]:
    assert stack.mail is not None
    return [kept for kept in stack.mail.messages() if order_id[:8] in kept.subject]


async def test_the_confirmation_email_arrives_with_the_orders_lines_and_total(
    stack: Stack, channel: grpc.aio.Channel, tokens: Tokens
) -> None:
    mug = await create_product(channel, tokens, "Blue mug", "12.00")
    tea = await create_product(channel, tokens, "Green tea", "1234.00")
    order = await place_order(channel, customer_token("alice@example.com"), [(mug, 2), (tea, 1)])

    async def arrived() -> list[KeptMessage]:
        return mail_for(stack, order.id)

    [kept] = await eventually(arrived, within=20, what="the confirmation email")
    assert kept.to == "alice@example.com"
    assert kept.subject == f"We have your order {order.id[:8]}"
    text = kept.text()
    assert f"2 x Blue mug ({mug.sku}) at USD 12.00: USD 24.00" in text
    assert f"1 x Green tea ({tea.sku}) at USD 1,234.00: USD 1,234.00" in text
    assert "Total: USD 1,258.00" in text
    assert order.id in text
    html = kept.html()
    assert html is not None
    assert "USD 1,258.00" in html


async def test_an_order_placed_without_an_email_claim_sends_nothing(
    stack: Stack, channel: grpc.aio.Channel, tokens: Tokens
) -> None:
    mug = await create_product(channel, tokens, "Blue mug", "12.00")
    silent = await place_order(channel, customer_token(None), [(mug, 1)])
    # An order placed after it, with an address: once its email is in, the first order's
    # event (published before it, on the same consumer) has been handled too.
    loud = await place_order(channel, customer_token("bob@example.com"), [(mug, 1)])

    async def arrived() -> list[KeptMessage]:
        return mail_for(stack, loud.id)

    await eventually(arrived, within=20, what="the later order's email")
    assert mail_for(stack, silent.id) == []


async def test_smtp_down_dead_letters_the_email_and_the_order_is_unaffected(
    stack: Stack, channel: grpc.aio.Channel, tokens: Tokens
) -> None:
    assert stack.mail is not None
    dead_letters = dead_letter_service_pb2_grpc.DeadLetterServiceStub(channel)
    admin = bearer(tokens.admin())
    mug = await create_product(channel, tokens, "Blue mug", "12.00")
    token = customer_token("carol@example.com")
    stack.mail.stop()
    try:
        order = await place_order(channel, token, [(mug, 3)])

        async def dead_letter() -> dead_letter_service_pb2.DeadLetter | None:
            listed = await dead_letters.ListDeadLetters(
                dead_letter_service_pb2.ListDeadLettersRequest(
                    consumer="notifications", page_size=1000
                ),
                metadata=admin,
            )
            for letter in listed.dead_letters:
                event = events_pb2.OrderCreated.FromString(letter.data)
                if event.order_id == order.id:
                    return letter
            return None

        letter = await eventually(dead_letter, within=30, what="the email's dead letter")
        assert letter.original_subject == "marketplace.order.created"
        assert letter.attempts == 5  # CONSUMER_MAX_DELIVER's default
        assert letter.error  # SMTP's error, e.g. the refused connection
        assert mail_for(stack, order.id) == []
        # The order and its stock are as if email did not exist.
        async with MarketplaceClient(channel, token=token) as customer:
            placed = await customer.get_order(order.id)
            product = await customer.get_product(mug.id)
        assert placed.status == order_pb2.ORDER_STATUS_PENDING_PAYMENT
        assert product.stock == 97
    finally:
        stack.mail.start()

    # SMTP back: the admin replays the dead letter and the email goes out, once.
    await dead_letters.ReplayDeadLetter(
        dead_letter_service_pb2.ReplayDeadLetterRequest(id=letter.id, request_id=str(uuid.uuid4())),
        metadata=admin,
    )
    [kept] = mail_for(stack, order.id)
    assert kept.to == "carol@example.com"
