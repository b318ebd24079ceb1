"""Swagger UI at /docs in chromium: it loads /openapi.json from the same origin, lists every
operation of the document, and "Try it out" calls the running API, with a pasted token."""

from __future__ import annotations

import json
import re

from playwright.sync_api import Page, expect

from devstack.envoy import OPENAPI_DOCUMENT
from tests.conftest import Tokens

HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


def operation_ids() -> list[str]:
    document = json.loads(OPENAPI_DOCUMENT.read_text())
    return [
        operation["operationId"]
        for path in document["paths"].values()
        for method, operation in path.items()
        if method in HTTP_METHODS
    ]


def test_swagger_ui_lists_every_operation(page: Page) -> None:
    page.goto("/docs")
    ids = operation_ids()
    expect(page.locator(".opblock")).to_have_count(len(ids))
    for operation_id in ids:
        expect(page.locator(f'[id$="-{operation_id}"]')).to_have_count(1)


def try_it_out(page: Page, operation_id: str) -> str:
    operation = page.locator(f'[id$="-{operation_id}"]')
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status").first
    expect(status).to_have_text(re.compile(r"\d{3}"))
    # Swagger UI adds "Undocumented" under a status the document does not list.
    return status.inner_text().split()[0]


def test_try_it_out_calls_the_api(page: Page, tokens: Tokens) -> None:
    page.goto("/docs")
    assert try_it_out(page, "CatalogService_ListProducts") == "200"
    # Without a token ListOrders is refused; with one pasted into "Authorize" it answers.
    assert try_it_out(page, "OrderService_ListOrders") == "401"

    page.goto("/docs")  # not reload(): deepLinking would reopen the last operation
    page.get_by_role("button", name="Authorize").first.click()
    page.locator(".modal-ux input").fill(tokens.customer("swagger-user"))
    page.locator(".modal-ux").get_by_role("button", name="Authorize").click()
    page.locator(".modal-ux").get_by_role("button", name="Close").click()
    assert try_it_out(page, "OrderService_ListOrders") == "200"
    # persistAuthorization: the token outlives a reload.
    page.goto("/docs")  # not reload(): deepLinking would reopen the last operation
    assert try_it_out(page, "OrderService_ListOrders") == "200"
