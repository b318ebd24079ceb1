"""The web faces Envoy serves itself (envoy.yaml's direct responses): the storefront's files,
its configuration, /openapi.json and Swagger UI's assets, with their content types and
security headers; and the development sign-in, which only devstack's rendering adds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from devstack.envoy import OPENAPI_DOCUMENT, STOREFRONT_DIR, SWAGGER_UI_DIR, render_envoy_config
from devstack.web import dev_token_endpoint
from tests.conftest import JWT_SECRET
from tests.stack import Stack

HTML = "text/html; charset=utf-8"
JAVASCRIPT = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"

SERVED = [
    ("/", STOREFRONT_DIR / "index.html", HTML),
    ("/storefront/app.js", STOREFRONT_DIR / "app.js", JAVASCRIPT),
    ("/storefront/api.js", STOREFRONT_DIR / "api.js", JAVASCRIPT),
    ("/storefront/views.js", STOREFRONT_DIR / "views.js", JAVASCRIPT),
    ("/storefront/style.css", STOREFRONT_DIR / "style.css", CSS),
    ("/docs", STOREFRONT_DIR / "docs" / "index.html", HTML),
    ("/docs/", STOREFRONT_DIR / "docs" / "index.html", HTML),
    ("/docs/init.js", STOREFRONT_DIR / "docs" / "init.js", JAVASCRIPT),
    ("/docs/swagger-ui-bundle.js", SWAGGER_UI_DIR / "swagger-ui-bundle.js", JAVASCRIPT),
    ("/docs/swagger-ui.css", SWAGGER_UI_DIR / "swagger-ui.css", CSS),
    ("/docs/favicon-32x32.png", SWAGGER_UI_DIR / "favicon-32x32.png", "image/png"),
    ("/openapi.json", OPENAPI_DOCUMENT, "application/json"),
]


@pytest.fixture(scope="module")
def web(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.rest_base, timeout=30) as client:
        yield client


@pytest.mark.parametrize(("path", "source", "content_type"), SERVED, ids=[s[0] for s in SERVED])
def test_each_file_is_served_whole_with_its_type(
    web: httpx.Client, path: str, source: Path, content_type: str
) -> None:
    reply = web.get(path)
    assert reply.status_code == 200, reply.text[:300]
    assert reply.headers["content-type"] == content_type
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.content == source.read_bytes()


def test_every_storefront_file_has_a_route() -> None:
    """A file added to clients/storefront/ without a route in envoy.yaml would be a 404."""
    served = {source for _, source, _ in SERVED}
    files = {path for path in STOREFRONT_DIR.rglob("*") if path.is_file()}
    assert files <= served, sorted(map(str, files - served))


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_pages_carry_a_content_security_policy(web: httpx.Client, stack: Stack, path: str) -> None:
    policy = (web.get(path)).headers["content-security-policy"]
    directives = dict(
        [*part.strip().split(" ", 1), ""][:2] for part in policy.split(";") if part.strip()
    )
    assert directives["default-src"] == "'self'"
    assert directives["object-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    # Stripe.js and its card API come from the provider's origin: this stack's localstripe.
    stripe_origin = f"http://127.0.0.1:{stack.localstripe_port}"
    assert stripe_origin in directives["script-src"].split()
    assert stripe_origin in directives["connect-src"].split()
    assert "'unsafe-inline'" not in directives["script-src"]
    assert directives["style-src"] == "'self'"


def test_the_storefront_config_names_the_stacks_stripe_js(web: httpx.Client, stack: Stack) -> None:
    reply = web.get("/storefront/config.json")
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "stripeJs": f"http://127.0.0.1:{stack.localstripe_port}/js.stripe.com/v3/",
        "publishableKey": "pk_test_marketplace",
        "devSignIn": False,
    }
    stripe_js = httpx.get(reply.json()["stripeJs"], timeout=10)
    assert stripe_js.status_code == 200
    # localstripe's emulation, with the createPaymentMethod devstack/stripejs.py teaches it.
    assert "Stripe().createPaymentMethod()" in stripe_js.text


def test_the_document_is_the_generated_one(web: httpx.Client) -> None:
    document = (web.get("/openapi.json")).json()
    assert document == json.loads(OPENAPI_DOCUMENT.read_text())
    assert document["openapi"].startswith("3.")


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_no_sign_in_route_without_devstack(web: httpx.Client, method: str) -> None:
    """The tests' Envoy is rendered as production would be: no /dev/token."""
    reply = web.request(method, "/dev/token", json={"name": "mallory", "role": "admin"})
    assert reply.status_code in {404, 405}, reply.text
    assert "token" not in reply.json()
    assert reply.json()["code"] in {5, 12}


def test_unknown_paths_are_still_json_404s(web: httpx.Client) -> None:
    reply = web.get("/storefront/missing.js")
    assert reply.status_code == 404
    assert reply.json()["details"][0]["reason"] == "ROUTE_NOT_FOUND"


def test_only_a_rendering_with_a_dev_port_has_the_sign_in_route() -> None:
    def render(dev_token_port: int | None) -> str:
        return render_envoy_config(
            http_port=1,
            grpc_port=2,
            admin_port=3,
            provider_proxy_port=4,
            localstripe_port=5,
            dev_token_port=dev_token_port,
        )

    committed = Path(__file__).parents[2] / "envoy.yaml"
    assert "/dev/token" not in committed.read_text()
    assert '"/dev/token"' not in render(None)
    with_dev = render(6)
    assert 'match: {path: "/dev/token"}' in with_dev
    assert "port_value: 6}" in with_dev
    assert '"devSignIn": true' in with_dev


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "a b"}, "a name is 1 to 64 letters"),
        ({"name": ""}, "a name is 1 to 64 letters"),
        ({"name": "x" * 65}, "a name is 1 to 64 letters"),
        ({"name": "carol", "role": "root"}, "the role is one of customer, admin"),
        (["carol"], "the body is a JSON object"),
    ],
)
def test_the_dev_sign_in_refuses_with_a_status(body: object, message: str) -> None:
    with dev_token_endpoint(JWT_SECRET) as port:
        reply = httpx.post(f"http://127.0.0.1:{port}/dev/token", json=body, timeout=10)
    assert reply.status_code == 400
    assert reply.json()["code"] == 3
    assert reply.json()["message"].startswith(message)


def test_the_dev_sign_in_mints_a_token_the_server_takes(stack: Stack) -> None:
    with dev_token_endpoint(JWT_SECRET) as port:
        answer = httpx.post(
            f"http://127.0.0.1:{port}/dev/token", json={"name": "carol"}, timeout=10
        ).json()
    assert answer["subject"] == "carol"
    assert answer["roles"] == ["customer"]
    claims = jwt.decode(answer["token"], JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "carol"
    assert claims["email"] == "carol@example.com"
    with httpx.Client(base_url=stack.rest_base, timeout=30) as web:
        reply = web.get("/v1/orders", headers={"authorization": f"Bearer {answer['token']}"})
        assert reply.status_code == 200, reply.text
        refused = web.post(
            "/v1/products", json={}, headers={"authorization": f"Bearer {answer['token']}"}
        )
        assert refused.status_code == 403
