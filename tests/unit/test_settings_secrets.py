"""The server refuses to start with secrets anyone can read: no JWT key source, and the
development stack's published webhook secret outside the development stack."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.settings import DEVELOPMENT_WEBHOOK_SECRET
from tests.unit.settings_of import settings_of


@pytest.fixture(autouse=True)
def _no_inherited_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STRIPE_WEBHOOK_SECRET", "MARKETPLACE_DEVSTACK"):
        monkeypatch.delenv(name, raising=False)


def test_a_webhook_secret_is_required() -> None:
    with pytest.raises(ValidationError, match="STRIPE_WEBHOOK_SECRET"):
        settings_of()


@pytest.mark.parametrize("secret", ["", "whsec_short"])
def test_an_empty_or_short_webhook_secret_is_refused(secret: str) -> None:
    with pytest.raises(ValidationError, match="STRIPE_WEBHOOK_SECRET"):
        settings_of(STRIPE_WEBHOOK_SECRET=secret)


@pytest.mark.parametrize("marker", [None, "0", "false"])
def test_the_development_webhook_secret_is_refused_outside_the_development_stack(
    marker: str | None,
) -> None:
    env = {"STRIPE_WEBHOOK_SECRET": DEVELOPMENT_WEBHOOK_SECRET}
    if marker is not None:
        env["MARKETPLACE_DEVSTACK"] = marker
    with pytest.raises(ValidationError, match="development stack's published secret"):
        settings_of(**env)


def test_the_development_stack_may_use_its_webhook_secret() -> None:
    chosen = settings_of(STRIPE_WEBHOOK_SECRET=DEVELOPMENT_WEBHOOK_SECRET, MARKETPLACE_DEVSTACK="1")
    assert chosen.stripe_webhook_secret == DEVELOPMENT_WEBHOOK_SECRET
    assert chosen.development_stack


def test_an_endpoints_own_secret_is_taken_anywhere() -> None:
    chosen = settings_of(STRIPE_WEBHOOK_SECRET="whsec_" + "r" * 32)
    assert not chosen.development_stack


def test_the_devstack_signs_with_the_secret_the_settings_know_as_public() -> None:
    from devstack.localstripe import DEV_WEBHOOK_SECRET

    assert DEV_WEBHOOK_SECRET == DEVELOPMENT_WEBHOOK_SECRET
