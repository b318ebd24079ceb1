"""The storefront and Swagger UI in Debian's chromium, driven by Playwright, against the real
stack of the end-to-end tests (server process, Envoy, localstripe, PostgreSQL) and a second
Envoy in front of it with make run's development sign-in (/dev/token).

Without chromium these tests fail with the command that installs it; the environment variable
MARKETPLACE_CHROMIUM names another Chromium or Chrome binary, and
MARKETPLACE_SKIP_BROWSER_TESTS=1 skips them instead (never in CI). A failing test leaves a
screenshot in tests/browser/screenshots/."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from devstack.envoy import EdgeLimits, envoy_in_front_of
from devstack.postgres import create_database, drop_database
from devstack.web import dev_token_endpoint
from tests.conftest import JWT_SECRET, Tokens
from tests.stack import Stack, running_stack

SCREENSHOTS = Path(__file__).parent / "screenshots"
# Debian's chromium: Playwright cannot download its own browser here.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SKIP_VARIABLE = "MARKETPLACE_SKIP_BROWSER_TESTS"
CHROMIUM_VARIABLE = "MARKETPLACE_CHROMIUM"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.browser)


def chromium_path() -> str:
    """Debian's chromium (or the browser MARKETPLACE_CHROMIUM names, on other systems), or the
    reason these tests cannot run: a failure unless skipped."""
    found = (
        os.environ.get(CHROMIUM_VARIABLE)
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if found:
        return found
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"no chromium, and {SKIP_VARIABLE}=1 skips the browser tests")
    pytest.fail(
        "the browser tests need Debian's chromium: sudo apt-get install chromium"
        f" (elsewhere, {CHROMIUM_VARIABLE}=/path/to/chromium; or {SKIP_VARIABLE}=1 skips"
        " them explicitly, never in CI)",
        pytrace=False,
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keeps each phase's report on the test, for the page fixture's screenshot on failure."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """The browser tests' own database, apart from the end-to-end tests' (whose background
    passes would sweep these rows, and the reverse)."""
    url = create_database(postgres_server_url, "marketplace_browser")
    yield url
    drop_database(postgres_server_url, url)


@pytest.fixture(scope="session")
def stack(database_url: str) -> Iterator[Stack]:
    with running_stack(database_url) as running:
        yield running


@pytest.fixture(scope="session")
def base_url(stack: Stack) -> Iterator[str]:
    """The storefront's origin: an Envoy in front of the stack's server, rendered as make run
    renders it, with the development sign-in and the stack's localstripe for Stripe.js."""
    with (
        tempfile.TemporaryDirectory(prefix="marketplace-web-") as scratch,
        dev_token_endpoint(JWT_SECRET) as dev_token_port,
        envoy_in_front_of(
            stack.grpc_port,
            Path(scratch),
            limits=EdgeLimits.without_rate_limits(),
            localstripe_port=stack.localstripe_port,
            dev_token_port=dev_token_port,
        ) as ports,
    ):
        yield f"http://127.0.0.1:{ports.http_port}"


# Per module, not per session: Playwright's sync API keeps its event loop marked running while
# it is started, and pytest-asyncio could not run the async tests of later modules.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, base_url: str, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (no storage: nobody signed in, an empty cart) on the
    storefront's origin. Uncaught exceptions and CSP violations fail the test."""
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(15_000)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    # The pages' CSP allows no inline script or style: anything it blocks is a bug.
    page.on(
        "console",
        lambda message: (
            problems.append(f"CSP: {message.text}")
            if "Content Security Policy" in message.text
            else None
        ),
    )
    yield page
    failed = any(
        getattr(getattr(request.node, f"report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )
    if failed:
        SCREENSHOTS.mkdir(exist_ok=True)
        page.screenshot(path=SCREENSHOTS / f"{request.node.name}.png", full_page=True)
    context.close()
    assert not problems, problems


@dataclass(frozen=True)
class Shop:
    """The catalog as an admin fills it, through the same REST API (with the stack's tokens)."""

    rest: httpx.Client
    tokens: Tokens

    def product(
        self, name: str, *, stock: int = 10, price: str = "12.50", sku: str | None = None
    ) -> dict[str, Any]:
        units, _, fraction = price.partition(".")
        body = {
            "sku": sku or f"{name.upper().replace(' ', '-')}-{uuid.uuid4().hex[:8].upper()}",
            "name": name,
            "description": f"{name}, made for the browser tests",
            "price": {
                "currencyCode": "USD",
                "units": units,
                "nanos": int(Decimal(f"0.{fraction or 0}") * 10**9),
            },
            "stock": str(stock),
        }
        reply = self.rest.post(
            "/v1/products",
            json=body,
            headers={"authorization": f"Bearer {self.tokens.admin()}"},
        )
        assert reply.status_code == 200, reply.text
        product: dict[str, Any] = reply.json()["product"]
        return product


@pytest.fixture(scope="session")
def shop(base_url: str, tokens: Tokens) -> Iterator[Shop]:
    with httpx.Client(base_url=base_url, timeout=30) as rest:
        yield Shop(rest, tokens)
