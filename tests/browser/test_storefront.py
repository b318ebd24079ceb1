"""A customer and an admin in the storefront, in chromium: browse, sign in, order, pay (and be
declined), run out of stock, cancel; the admin view's products in the catalog."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from playwright.sync_api import Page, Route, expect

from tests.browser.conftest import Shop
from tests.conftest import Tokens

GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000341"


def sign_in(page: Page, name: str | None = None, *, admin: bool = False) -> str:
    name = name or f"shopper-{uuid.uuid4().hex[:8]}"
    page.goto("/#/signin")
    page.fill("#name", name)
    page.click("#sign-in-admin" if admin else "#sign-in")
    expect(page.locator("#who")).to_contain_text(f"Signed in as {name}")
    return name


def add_to_cart(page: Page, product: dict[str, str], quantity: int = 1) -> None:
    page.goto(f"/#/product/{product['id']}")
    expect(page.get_by_role("heading", name=product["name"])).to_be_visible()
    page.fill("#quantity", str(quantity))
    page.get_by_role("button", name="Add to cart").click()
    expect(page.locator("#added")).to_contain_text(f"Added {product['name']}")


def place_order(page: Page) -> None:
    page.click("#cart-link")
    page.click("#place-order")
    expect(page.locator("#order-status")).to_have_text("PENDING PAYMENT")


def pay(page: Page, card_number: str) -> None:
    """Types a card into the Stripe card field (localstripe's emulation of Stripe Elements)."""
    field = page.locator("#card-element")
    field.locator("input[placeholder=number]").fill(card_number)
    field.locator("input[placeholder=exp_month]").fill("12")
    field.locator("input[placeholder=exp_year]").fill("30")
    field.locator("input[placeholder=cvc]").fill("123")
    field.locator("input[placeholder=postal_code]").fill("75001")
    page.click("#pay")


def shown_rows(page: Page) -> dict[str, str]:
    """The catalog page's rows: SKU to the row's text."""
    rows = page.locator("table.products tbody tr")
    expect(rows.first).to_be_visible()
    shown: dict[str, str] = dict(
        rows.evaluate_all("rows => rows.map(r => [r.dataset.sku, r.innerText])")
    )
    return shown


def test_the_catalog_pages_with_prices_and_stock(page: Page, shop: Shop) -> None:
    tag = uuid.uuid4().hex[:6].upper()
    made = {
        f"PAGE-{tag}-{n:02}": shop.product(
            f"Page item {n:02}", stock=n + 1, sku=f"PAGE-{tag}-{n:02}"
        )
        for n in range(12)
    }

    page.goto("/")
    expect(page.locator("table.products tbody tr")).to_have_count(10)
    first_page = shown_rows(page)
    page.get_by_role("link", name="Next page").click()
    expect(page.locator("table.products tbody tr").first).not_to_have_attribute(
        "data-sku", next(iter(first_page))
    )
    second_page = shown_rows(page)
    assert not first_page.keys() & second_page.keys()
    # The products made show their price and stock on the pages that hold them.
    seen = {sku: text for sku, text in (first_page | second_page).items() if sku in made}
    assert seen, (first_page, second_page)
    for sku, text in seen.items():
        assert "$12.50" in text, text
        assert f"{made[sku]['stock']} in stock" in text, text
    page.get_by_role("button", name="Previous page").click()
    expect(page.locator("table.products tbody tr").first).to_have_attribute(
        "data-sku", next(iter(first_page))
    )

    page.goto(f"/#/product/{made[f'PAGE-{tag}-00']['id']}")
    expect(page.get_by_role("heading", name="Page item 00")).to_be_visible()
    expect(page.locator("p.price")).to_have_text("$12.50")
    expect(page.locator("p.stock")).to_have_text("1 in stock")


def test_signing_in_by_name(page: Page) -> None:
    page.goto("/")
    expect(page.get_by_role("link", name="Sign in")).to_be_visible()
    name = sign_in(page)
    page.reload()
    expect(page.locator("#who")).to_have_text(f"Signed in as {name}")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("link", name="Sign in")).to_be_visible()

    # A name the sign-in refuses: its own words, nobody signed in.
    page.goto("/#/signin")
    page.fill("#name", "no spaces allowed")
    page.click("#sign-in")
    expect(page.locator("#signin-message [role=alert]")).to_have_text(
        re.compile(r"^a name is 1 to 64 letters, digits")
    )
    expect(page.get_by_role("link", name="Sign in")).to_be_visible()


def test_two_products_ordered_and_paid(page: Page, shop: Shop) -> None:
    mug, poster = (
        shop.product("Browser mug", price="12.50"),
        shop.product("Browser poster", price="9.00"),
    )
    sign_in(page)
    add_to_cart(page, mug, 2)
    add_to_cart(page, poster)
    expect(page.locator("#cart-link")).to_have_text("Cart (3)")
    place_order(page)
    expect(page.locator("#order-summary")).to_contain_text(
        f"2 \N{MULTIPLICATION SIGN} {mug['sku']}"
    )
    expect(page.locator("#order-summary")).to_contain_text("Total: $34.00")

    pay(page, GOOD_CARD)
    expect(page.locator("#order-status")).to_have_text("PAID")
    expect(page.locator("#payments")).to_contain_text("$34.00: SUCCEEDED")
    expect(page.locator("#pay-form")).to_be_hidden()
    page.get_by_role("link", name="Orders").first.click()
    expect(page.locator("table.orders tbody tr").first.locator("td.status")).to_have_text("PAID")
    expect(page.locator("#cart-link")).to_have_text("Cart (0)")


def test_a_declined_card_then_a_good_one(page: Page, shop: Shop) -> None:
    lamp = shop.product("Browser lamp", price="30.00")
    sign_in(page)
    add_to_cart(page, lamp)
    place_order(page)

    pay(page, DECLINED_CARD)
    expect(page.locator("#payment-message")).to_contain_text(
        re.compile(r"The payment was declined: .*declined.*Try another card", re.IGNORECASE)
    )
    expect(page.locator("#order-status")).to_have_text("PENDING PAYMENT")
    expect(page.locator("#payments")).to_contain_text("FAILED")

    pay(page, GOOD_CARD)
    expect(page.locator("#order-status")).to_have_text("PAID")
    expect(page.locator("#payments")).to_contain_text("SUCCEEDED")


def test_ordering_more_than_is_left_names_the_line(page: Page, shop: Shop) -> None:
    scarce, plenty = shop.product("Scarce vase", stock=2), shop.product("Plenty cup", stock=50)
    sign_in(page)
    add_to_cart(page, scarce, 5)
    add_to_cart(page, plenty, 1)
    page.click("#cart-link")
    page.click("#place-order")

    refusal = page.locator("#order-message [role=alert]")
    expect(refusal).to_contain_text("not enough stock for 1 line(s)")
    expect(refusal.locator("li")).to_have_count(1)
    expect(refusal.locator("li")).to_have_text(
        "Scarce vase: requested 5, available 2 (only 2 left)"
    )
    expect(page).to_have_url(re.compile(r"#/cart$"))

    # Fewer, and the order goes through.
    page.get_by_label("Quantity of Scarce vase").fill("2")
    page.get_by_label("Quantity of Scarce vase").dispatch_event("change")
    page.click("#place-order")
    expect(page.locator("#order-status")).to_have_text("PENDING PAYMENT")


def test_cancelling_a_paid_order_refunds_it(page: Page, shop: Shop) -> None:
    kettle = shop.product("Browser kettle", price="45.00")
    sign_in(page)
    add_to_cart(page, kettle)
    place_order(page)
    pay(page, GOOD_CARD)
    expect(page.locator("#order-status")).to_have_text("PAID")

    page.click("#cancel")
    expect(page.locator("#order-status")).to_have_text(re.compile("REFUNDED|CANCELLED"))
    expect(page.locator("#payments")).to_contain_text("$45.00: REFUNDED, $45.00 refunded")
    expect(page.locator("#cancel")).to_be_hidden()


def test_the_admin_view_adds_a_product_the_catalog_shows(page: Page) -> None:
    sku = f"AAA-{uuid.uuid4().hex[:8].upper()}"
    sign_in(page, admin=True)
    expect(page.get_by_role("heading", name="Admin")).to_be_visible()
    page.fill("#new-sku", sku)
    page.fill("#new-name", "Admin teapot")
    page.fill("#new-description", "Made in the admin view")
    page.fill("#new-price", "19.90")
    page.fill("#new-stock", "3")
    page.get_by_role("button", name="Create product").click()
    expect(page.locator("#create-message")).to_contain_text(f"Created Admin teapot ({sku})")

    page.select_option("#adjust-product", label=f"{sku}: Admin teapot (3)")
    page.fill("#adjust-delta", "4")
    page.get_by_role("button", name="Adjust stock").click()
    expect(page.locator("#adjust-message")).to_have_text(f"{sku} now has 7 in stock.")

    # A duplicate SKU is refused with the server's own words.
    page.fill("#new-sku", sku)
    page.fill("#new-name", "Second teapot")
    page.fill("#new-price", "1.00")
    page.get_by_role("button", name="Create product").click()
    expect(page.locator("#create-message [role=alert]")).not_to_contain_text("undefined")
    expect(page.locator("#create-message [role=alert]")).to_contain_text(sku)

    page.get_by_role("link", name="Catalog").click()
    row = page.locator(f'tr[data-sku="{sku}"]')
    expect(row).to_contain_text("Admin teapot")
    expect(row).to_contain_text("$19.90")
    expect(row).to_contain_text("7 in stock")


def test_a_lost_answer_is_retried_with_the_same_request_id(
    page: Page, shop: Shop, tokens: Tokens
) -> None:
    """The order is made, its answer lost on the way back; the customer's second click sends
    the same request id, and the server answers with the same one order."""
    clock = shop.product("Retry clock", stock=5)
    name = sign_in(page)
    add_to_cart(page, clock, 2)
    sent: list[dict[str, Any]] = []

    def lose_the_first_answer(route: Route) -> None:
        sent.append(json.loads(route.request.post_data or "{}"))
        if len(sent) == 1:
            route.fetch()  # the server makes the order...
            route.abort("connectionreset")  # ...and the page never hears of it
        else:
            route.continue_()

    page.route("**/v1/orders", lose_the_first_answer)
    page.click("#cart-link")
    page.click("#place-order")
    expect(page.locator("#order-message [role=alert]")).to_contain_text("could not be reached")
    page.click("#place-order")
    expect(page.locator("#order-status")).to_have_text("PENDING PAYMENT")

    assert len(sent) == 2
    assert sent[0] == sent[1]
    uuid.UUID(sent[0]["requestId"])  # made in the browser: crypto.randomUUID()
    orders = shop.rest.get(
        "/v1/orders", headers={"authorization": f"Bearer {tokens.customer(name)}"}
    ).json()["orders"]
    assert len(orders) == 1
    assert page.url.endswith(orders[0]["id"])
    stock = shop.rest.get(f"/v1/products/{clock['id']}").json()["product"]["stock"]
    assert stock == "3"  # taken once


def test_a_payment_retried_after_a_lost_request_or_answer(page: Page, shop: Shop) -> None:
    """A payment request that never arrived is sent again as it was (the same PaymentMethod
    and request id); one whose answer was lost is found paid, with one payment."""
    sign_in(page)
    sent: list[dict[str, Any]] = []
    lose: list[str] = []  # what to do to the next POST: "request" or "answer"

    def flaky_network(route: Route) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        sent.append(json.loads(route.request.post_data or "{}"))
        if lose and lose.pop() == "answer":
            route.fetch()  # the server charges the card...
            route.abort("connectionreset")  # ...and the page never hears of it
        elif len(sent) == 1:  # the first payment request never arrives
            route.abort("connectionrefused")
        else:
            route.continue_()

    page.route("**/v1/orders/*/payments", flaky_network)
    add_to_cart(page, shop.product("Retry bell", price="8.00"))
    place_order(page)
    pay(page, GOOD_CARD)
    expect(page.locator("#payment-message [role=alert]")).to_contain_text("could not be reached")
    page.click("#pay")
    expect(page.locator("#order-status")).to_have_text("PAID")
    assert len(sent) == 2
    assert sent[0] == sent[1]
    assert sent[0]["paymentMethod"].startswith("pm_")
    expect(page.locator("#payments li")).to_have_count(1)

    lose.append("answer")
    add_to_cart(page, shop.product("Retry gong", price="3.00"))
    place_order(page)
    pay(page, GOOD_CARD)
    expect(page.locator("#order-status")).to_have_text("PAID")
    expect(page.locator("#payment-message")).to_have_text("The order is paid.")
    expect(page.locator("#payments li")).to_have_count(1)
    expect(page.locator("#payments")).to_contain_text("$3.00: SUCCEEDED")


def test_order_history_pages_and_follows_statuses(page: Page, shop: Shop, tokens: Tokens) -> None:
    name = sign_in(page)
    token = {"authorization": f"Bearer {tokens.customer(name)}"}
    pen = shop.product("History pen", stock=100, price="1.00")
    for n in range(21):
        body = {"requestId": f"{name}-{n}", "items": [{"productId": pen["id"], "quantity": 1}]}
        assert shop.rest.post("/v1/orders", json=body, headers=token).status_code == 200
    page.get_by_role("link", name="Orders").first.click()
    rows = page.locator("table.orders tbody tr")
    expect(rows).to_have_count(20)
    expect(rows.first.locator("td.status")).to_have_text("PENDING PAYMENT")
    newest = rows.first.get_attribute("data-order-id")
    page.get_by_role("link", name="Older orders").click()
    expect(rows).to_have_count(1)
    page.get_by_role("button", name="Newer orders").click()
    expect(rows).to_have_count(20)

    # A change made elsewhere shows without a reload: the page refreshes itself.
    cancelled = shop.rest.post(
        f"/v1/orders/{newest}:cancel", json={"requestId": f"cancel-{newest}"}, headers=token
    )
    assert cancelled.status_code == 200, cancelled.text
    expect(page.locator(f'tr[data-order-id="{newest}"] td.status')).to_have_text("CANCELLED")
