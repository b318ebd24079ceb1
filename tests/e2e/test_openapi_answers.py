"""generated/openapi.json says what Envoy answers: every REST operation, called on a real
stack (server, Envoy, localstripe), answers a body its documented schema accepts, strictly
(no key the document does not name), successes and errors alike; every request body sent
is one the document allows (no read-only field)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_schema_validator import OAS30ReadValidator, OAS30WriteValidator

from tests.conftest import Tokens
from tests.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT: dict[str, Any] = json.loads((ROOT / "generated" / "openapi.json").read_text())


def _closed(node: Any) -> Any:
    """The document with every object of named properties closed to other keys."""
    if isinstance(node, list):
        return [_closed(value) for value in node]
    if not isinstance(node, dict):
        return node
    node = {key: _closed(value) for key, value in node.items()}
    if node.get("type") == "object" and "properties" in node:
        node.setdefault("additionalProperties", False)
    return node


CLOSED: dict[str, Any] = _closed(DOCUMENT)


class DocumentedApi:
    """Calls REST operations, checking each request and answer against the document."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http
        self.answered: dict[tuple[str, str], set[int]] = {}

    async def call(
        self,
        method: str,
        url: str,
        token: str | None = None,
        body: Any = None,
        params: dict[str, str | int] | None = None,
    ) -> httpx.Response:
        template, operation = _operation(method, url)
        if body is not None:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            _validate(OAS30WriteValidator, schema, body)
        query = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        assert set(params or {}) <= query
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = await self._http.request(method, url, json=body, params=params, headers=headers)
        responses = operation["responses"]
        code = str(response.status_code)
        documented = responses.get(code) or responses[f"{code[0]}XX"]
        if "$ref" in documented:
            documented = CLOSED["components"]["responses"][documented["$ref"].rsplit("/")[-1]]
        schema = documented["content"]["application/json"]["schema"]
        _validate(OAS30ReadValidator, schema, response.json())
        self.answered.setdefault((method, template), set()).add(response.status_code)
        return response


def _operation(method: str, url: str) -> tuple[str, dict[str, Any]]:
    for template, item in CLOSED["paths"].items():
        pattern = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, url) and method.lower() in item:
            return template, item[method.lower()]
    raise AssertionError(f"the document has no operation for {method} {url}")


def _validate(validator: Any, schema: dict[str, Any], instance: Any) -> None:
    validator({**schema, "components": CLOSED["components"]}).validate(instance)


async def test_every_operation_answers_as_documented(
    stack: Stack, tokens: Tokens, rest: httpx.AsyncClient
) -> None:
    api = DocumentedApi(rest)
    admin, alice = tokens.admin(), tokens.customer("openapi-alice")
    mug = {
        "sku": f"MUG-{uuid.uuid4().hex[:8]}",
        "name": "Mug",
        "description": "A mug",
        "price": {"currencyCode": "USD", "units": "12", "nanos": 500_000_000},
        "stock": "3",
    }
    created = await api.call("POST", "/v1/products", admin, mug)
    product_id = created.json()["product"]["id"]
    await api.call("GET", "/v1/products", params={"pageSize": 2})
    await api.call("GET", f"/v1/products/{product_id}")
    await api.call(
        "PATCH",
        f"/v1/products/{product_id}",
        admin,
        {"description": "A bigger mug"},
        params={"updateMask": "description"},
    )
    adjustment = {"delta": "2", "reason": "found two", "requestId": str(uuid.uuid4())}
    await api.call("POST", f"/v1/products/{product_id}:adjustStock", admin, adjustment)
    # Errors: no token, no role, a taken SKU, an unknown id, a line over the stock left.
    assert (await api.call("POST", "/v1/products", None, mug)).status_code == 401
    assert (await api.call("POST", "/v1/products", alice, mug)).status_code == 403
    assert (await api.call("POST", "/v1/products", admin, mug)).status_code == 409
    assert (await api.call("GET", f"/v1/products/{uuid.uuid4()}")).status_code == 404

    def order(quantity: int) -> dict[str, Any]:
        line = {"productId": product_id, "quantity": quantity}
        return {"requestId": str(uuid.uuid4()), "items": [line]}

    short = await api.call("POST", "/v1/orders", alice, order(99))
    assert short.status_code == 400
    assert "type.googleapis.com/google.rpc.PreconditionFailure" in {
        detail["@type"] for detail in short.json()["details"]
    }
    paid = (await api.call("POST", "/v1/orders", alice, order(1))).json()["order"]
    await api.call("GET", "/v1/orders", alice, params={"pageSize": 5})
    await api.call("GET", f"/v1/orders/{paid['id']}", alice)
    card = await stack.localstripe.payment_method("4242424242424242")
    paying = {"requestId": str(uuid.uuid4()), "paymentMethod": card}
    payment = await api.call("POST", f"/v1/orders/{paid['id']}/payments", alice, paying)
    assert payment.json()["payment"]["status"] == "PAYMENT_STATUS_SUCCEEDED"
    payment_id = payment.json()["payment"]["id"]
    await api.call("GET", f"/v1/orders/{paid['id']}/payments", alice, params={"pageSize": 5})
    await api.call("GET", f"/v1/payments/{payment_id}", alice)
    refund = {
        "requestId": str(uuid.uuid4()),
        "amount": {"currencyCode": "USD", "units": "1", "nanos": 0},
        "reason": "chipped",
    }
    await api.call("POST", f"/v1/payments/{payment_id}:refund", admin, refund)
    unpaid = (await api.call("POST", "/v1/orders", alice, order(1))).json()["order"]
    declined_card = await stack.localstripe.payment_method("4000000000000341")
    declining = {"requestId": str(uuid.uuid4()), "paymentMethod": declined_card}
    declined = await api.call("POST", f"/v1/orders/{unpaid['id']}/payments", alice, declining)
    assert declined.json()["payment"]["status"] == "PAYMENT_STATUS_FAILED"
    cancelling = {"requestId": str(uuid.uuid4())}
    cancelled = await api.call("POST", f"/v1/orders/{unpaid['id']}:cancel", alice, cancelling)
    assert cancelled.json()["order"]["status"] == "ORDER_STATUS_CANCELLED"
    await api.call("GET", "/v1/deadLetters", admin, params={"pageSize": 10})
    replay = {"requestId": str(uuid.uuid4())}
    assert (await api.call("POST", "/v1/deadLetters/1:replay", admin, replay)).status_code == 404
    # The webhook's body is the provider's, not JSON of the document's: only its answer.
    unsigned = await rest.post("/v1/payments:webhook", content=b"{}")
    assert unsigned.status_code == 401
    _validate(
        OAS30ReadValidator, {"$ref": "#/components/schemas/google.rpc.Status"}, unsigned.json()
    )
    api.answered[("POST", "/v1/payments:webhook")] = {unsigned.status_code}

    documented = {(verb.upper(), path) for path, item in DOCUMENT["paths"].items() for verb in item}
    assert set(api.answered) == documented
