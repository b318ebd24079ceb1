"""localstripe, the Stripe emulator the stack's server charges against (through Envoy's
fault-injecting provider listener): running it, and talking to it directly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
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


# A crash loses at most this much of localstripe's writes; each save pickles the whole store.
STORE_SAVE_DELAY_SECONDS = 0.5


class _StoreFile:
    """localstripe's store kept in `path`, so a payment outlives a restart of the emulator.

    localstripe's own persistence pickles the whole store to one fixed /tmp file on every
    write: shared by every emulator on the machine, and slower with every object it holds.
    This one writes the stack's own file, at most once per STORE_SAVE_DELAY_SECONDS, and
    on a clean stop.
    """

    def __init__(self, path: Path, store: dict[str, Any]) -> None:
        self._path = path
        self._store = store
        self._pending: asyncio.TimerHandle | None = None

    def load(self) -> None:
        if self._path.exists():
            with self._path.open("rb") as saved:
                # S301: the stack's own file, written by save() below under the data dir.
                self._store.update(pickle.load(saved))  # noqa: S301

    def save_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.save()
            return
        if self._pending is None:
            self._pending = loop.call_later(STORE_SAVE_DELAY_SECONDS, self.save)

    def save(self) -> None:
        self._pending = None
        partial = self._path.with_name(self._path.name + ".partial")
        with partial.open("wb") as out:
            pickle.dump(dict(self._store), out, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(partial, self._path)  # a crash mid-write leaves the previous file whole


def serve_localstripe(port: int, store_path: Path | None = None) -> None:
    """Runs localstripe on 127.0.0.1:`port` until SIGTERM, with two changes to the emulator.

    Stripe's API (2026-09-30 onwards, and the SDK pins a newer version) restricts a
    PaymentIntent to cards with `allowed_payment_method_types`; localstripe 1.15 knows only
    the older `payment_method_types` and rejects unknown parameters, so it learns the new
    name here rather than the adapter sending what real Stripe now refuses. And its store
    lives in `store_path` (see _StoreFile) or, without one, only in memory.
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
    if store_path is None:
        resources.Store.dump_to_disk = lambda store: None
    else:
        store_file = _StoreFile(store_path, resources.store)
        store_file.load()
        resources.Store.dump_to_disk = lambda store: store_file.save_soon()

        async def save_on_stop(app: web.Application) -> None:
            store_file.save()

        app.on_cleanup.append(save_on_stop)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    web.run_app(app, host="127.0.0.1", port=port, shutdown_timeout=1, print=None)


def start_localstripe(
    port: int, *, log: IO[Any] | int | None = None, store_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """localstripe in its own process: empty, or with the store kept in `store_path`."""
    store = ["--store", str(store_path)] if store_path is not None else []
    return subprocess.Popen(
        [sys.executable, "-m", "devstack", "localstripe", "--port", str(port), *store],
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


class CardRefused(Exception):
    """localstripe would not make a PaymentMethod of a card; the message is its reason."""


def create_test_payment_method(localstripe_port: int, card_number: str) -> str:
    """A new card PaymentMethod at localstripe; its id (pm_...). Raises CardRefused."""
    card = {"number": card_number, "exp_month": "12", "exp_year": "2030", "cvc": "123"}
    form = {"type": "card", **{f"card[{key}]": value for key, value in card.items()}}
    try:
        body = _localstripe_request(localstripe_port, "/v1/payment_methods", form)
    except urllib.error.HTTPError as error:
        if not 400 <= error.code < 500:
            raise
        raise CardRefused(_stripe_error(error)) from error
    payment_method_id: str = json.loads(body)["id"]
    return payment_method_id


def _stripe_error(error: urllib.error.HTTPError) -> str:
    """A Stripe-shaped error answer as one line: its message, type and HTTP status."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        detail = json.loads(error.read())["error"]
        return f"{detail['message']} ({detail.get('type', 'error')}, HTTP {error.code})"
    return f"HTTP {error.code} {error.reason}"
