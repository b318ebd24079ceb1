"""The wait between tries of the loops that run until cancelled (server/events/backoff.py)."""

from __future__ import annotations

import asyncio

import pytest

import server.events.backoff as backoff_module
from server.events.backoff import Backoff


def waits(backoff: Backoff, steps: list[str], monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The sleeps `backoff` asks for, running "wait" and "reset" steps in order."""
    asked: list[float] = []

    async def sleep(seconds: float) -> None:
        asked.append(round(seconds, 3))

    async def run() -> None:
        for step in steps:
            if step == "wait":
                await backoff.wait()
            else:
                backoff.reset()

    monkeypatch.setattr(backoff_module.asyncio, "sleep", sleep)
    asyncio.run(run())
    return asked


def test_waits_double_up_to_the_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff_module.random, "uniform", lambda low, high: 1.0)
    assert waits(Backoff(0.5, 3.0), ["wait"] * 5, monkeypatch) == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_progress_starts_the_waits_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff_module.random, "uniform", lambda low, high: 1.0)
    steps = ["wait", "wait", "wait", "reset", "wait", "wait"]
    assert waits(Backoff(1.0, 10.0), steps, monkeypatch) == [1.0, 2.0, 4.0, 1.0, 2.0]


def test_each_wait_is_jittered_within_a_fifth(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = waits(Backoff(1.0, 1.0), ["wait"] * 200, monkeypatch)
    assert all(0.8 <= wait <= 1.2 for wait in asked)
    assert len(set(asked)) > 1
