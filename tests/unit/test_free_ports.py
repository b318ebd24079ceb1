"""Ports handed to the stack's processes never repeat within one test process: the kernel can
give two probes in a row the same free port, and two processes would then race to bind it."""

from __future__ import annotations

from typing import Any

import pytest

import devstack.processes as processes


class _Probe:
    """A socket whose kernel-chosen port comes from a script."""

    def __init__(self, script: list[int]) -> None:
        self._script = script
        self._port = 0

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        self._port = self._script.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self._port)


def test_a_port_the_kernel_offers_twice_is_handed_out_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = [41001, 41001, 41002, 41001, 41003]

    def probe(*args: Any) -> _Probe:
        return _Probe(script)

    monkeypatch.setattr(processes, "_handed_out", set())
    monkeypatch.setattr(processes.socket, "socket", probe)
    assert processes.free_ports(2) == [41001, 41002]
    assert processes.free_port() == 41003


def test_real_ports_are_distinct_and_bindable() -> None:
    ports = processes.free_ports(50)
    assert len(set(ports)) == 50
    assert not any(processes.port_is_taken(port) for port in ports)
