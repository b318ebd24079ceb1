"""localstripe, the Stripe emulator the stack's server charges against (through Envoy's
fault-injecting provider listener): running it, and talking to it directly."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import IO, Any

from devstack import REPO_ROOT
from devstack.processes import wait_until_ready

# localstripe accepts any secret key of this shape; the webhook secret signs its events.
# Both are for the local emulator only (and the settings' defaults), never for Stripe.
LOCALSTRIPE_API_KEY = "sk_test_marketplace"
DEV_WEBHOOK_SECRET = "whsec_marketplace_development"  # noqa: S105
WEBHOOK_PATH = "/v1/payments:webhook"
# Stripe's test cards, as localstripe knows them.
SUCCESS_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000341"  # attaches fine, declined when charged


def serve_localstripe(port: int) -> None:
    """Runs localstripe on 127.0.0.1:`port` until SIGTERM, with two changes to the emulator.

    Stripe's API (2026-09-30 onwards, and the SDK pins a newer version) restricts a
    PaymentIntent to cards with `allowed_payment_method_types`; localstripe 1.15 knows only
    the older `payment_method_types` and rejects unknown parameters, so it learns the new
    name here rather than the adapter sending what real Stripe now refuses. And it pickles
    its whole store to one fixed /tmp file on every write, which concurrent emulators would
    share; every run starts empty anyway, so nothing is written.
    Its own entry point also listens on every interface; this one only on loopback.
    """
    from aiohttp import web
    from localstripe import resources
    from localstripe.server import app

    create_intent = resources.PaymentIntent.__init__

    def accept_allowed_types(
        intent: object, *args: Any, allowed_payment_method_types: Any = None, **kwargs: Any
    ) -> None:
        if allowed_payment_method_types is not None:
            kwargs["payment_method_types"] = allowed_payment_method_types
        create_intent(intent, *args, **kwargs)

    resources.PaymentIntent.__init__ = accept_allowed_types
    resources.Store.dump_to_disk = lambda store: None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    web.run_app(app, host="127.0.0.1", port=port, shutdown_timeout=1, print=None)


def start_localstripe(port: int, *, log: IO[Any] | int | None = None) -> subprocess.Popen[bytes]:
    """localstripe in its own process, empty (see serve_localstripe)."""
    return subprocess.Popen(
        [sys.executable, "-m", "devstack", "localstripe", "--port", str(port)],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def _localstripe_request(
    port: int, path: str, form: Mapping[str, str] | None = None, *, timeout: float = 5
) -> bytes:
    """One request to localstripe itself (not through Envoy); POST when `form` is given."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={"Authorization": f"Bearer {LOCALSTRIPE_API_KEY}"},
    )
    # S310 fears file:// and custom schemes; this URL is always http://127.0.0.1.
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
        body: bytes = reply.read()
        return body


def wait_for_localstripe(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    def is_answering() -> bool:
        with contextlib.suppress(OSError):
            _localstripe_request(port, "/v1/payment_intents?limit=1", timeout=1)
            return True
        return False

    wait_until_ready(is_answering, process, f"localstripe on port {port}", timeout)


def register_localstripe_webhook(localstripe_port: int, url: str, secret: str) -> None:
    """localstripe posts every event, signed with `secret`, to `url`."""
    _localstripe_request(
        localstripe_port, "/_config/webhooks/marketplace", {"url": url, "secret": secret}
    )


def create_test_payment_method(localstripe_port: int, card_number: str) -> str:
    """A new card PaymentMethod at localstripe; its id (pm_...)."""
    body = _localstripe_request(
        localstripe_port,
        "/v1/payment_methods",
        {
            "type": "card",
            "card[number]": card_number,
            "card[exp_month]": "12",
            "card[exp_year]": "2030",
            "card[cvc]": "123",
        },
    )
    payment_method_id: str = json.loads(body)["id"]
    return payment_method_id
