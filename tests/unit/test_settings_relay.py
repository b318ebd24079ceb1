"""Where the outbox relay runs: OUTBOX_RELAY and OUTBOX_RELAY_NICE."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.settings import Settings
from tests.unit.settings_of import settings_of


def settings(**env: str) -> Settings:
    return settings_of(STRIPE_WEBHOOK_SECRET="whsec_" + "x" * 32, **env)


@pytest.fixture(autouse=True)
def _no_inherited_relay_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OUTBOX_RELAY", "OUTBOX_RELAY_NICE"):
        monkeypatch.delenv(name, raising=False)


def test_by_default_the_relay_has_a_lower_priority_process_of_its_own() -> None:
    defaults = settings()
    assert (defaults.outbox_relay, defaults.outbox_relay_nice) == ("process", 19)


def test_the_relay_can_run_in_every_worker_at_the_workers_priority() -> None:
    chosen = settings(OUTBOX_RELAY="worker", OUTBOX_RELAY_NICE="0")
    assert (chosen.outbox_relay, chosen.outbox_relay_nice) == ("worker", 0)


@pytest.mark.parametrize(
    ("name", "value"),
    [("OUTBOX_RELAY", "thread"), ("OUTBOX_RELAY_NICE", "-5"), ("OUTBOX_RELAY_NICE", "20")],
)
def test_an_unknown_place_or_a_nice_outside_0_to_19_is_refused(name: str, value: str) -> None:
    with pytest.raises(ValidationError, match=name):
        settings(**{name: value})
