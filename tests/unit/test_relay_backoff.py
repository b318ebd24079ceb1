"""The relay's wait between sessions: it grows while sessions keep failing soon after they
begin (a database that keeps dropping, or a failure after every connect, such as a bug), and
starts from the shortest again after a session that ran well for a while."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import psycopg
import pytest
from prometheus_client import CollectorRegistry

import server.events.backoff as backoff_module
import server.events.relay as relay_module
from server.events.nats import NatsConnection
from server.events.relay import OutboxMetrics, Relay, RelaySettings


class _Session:
    async def __aenter__(self) -> _Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _FailingRelay(Relay):
    """Each session fails as scripted: (seconds it lasted on the fake clock, the error)."""

    def __init__(self, script: list[tuple[float, Exception]]) -> None:
        async def connect() -> psycopg.AsyncConnection[Any]:
            return cast(psycopg.AsyncConnection[Any], _Session())

        super().__init__(
            connect,
            cast(NatsConnection, object()),
            OutboxMetrics.create(CollectorRegistry()),
            RelaySettings(),
        )
        self.now = 0.0
        self._clock = lambda: self.now
        self._script = script

    async def _follow_then_lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        lasted, error = self._script.pop(0)
        self.now += lasted
        raise error


def waits_between(relay: _FailingRelay, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits `relay.run()` asks for until its script runs out, without the jitter."""
    waits: list[float] = []
    monkeypatch.setattr(backoff_module.random, "uniform", lambda low, high: 1.0)

    async def sleep(seconds: float) -> None:
        waits.append(round(seconds, 3))
        if not relay._script:
            raise asyncio.CancelledError

    monkeypatch.setattr(relay_module.asyncio, "sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(relay.run())
    return waits


def test_a_failure_right_after_every_connect_backs_off_to_the_longest_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = _FailingRelay([(0.01, RuntimeError("a bug in the relay"))] * 8)
    assert waits_between(relay, monkeypatch) == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


def test_a_database_that_keeps_dropping_is_retried_ever_more_slowly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = _FailingRelay([(1.0, psycopg.OperationalError("server closed the connection"))] * 4)
    assert waits_between(relay, monkeypatch) == [0.1, 0.2, 0.4, 0.8]


def test_after_a_session_that_ran_well_the_wait_starts_from_the_shortest_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = _FailingRelay(
        [(0.01, RuntimeError("first"))] * 3
        + [(3600.0, psycopg.OperationalError("restarted after an hour"))]
        + [(0.01, RuntimeError("then"))]
    )
    assert waits_between(relay, monkeypatch) == [0.1, 0.2, 0.4, 0.1, 0.2]
