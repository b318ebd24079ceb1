"""Ports, and starting, waiting for and stopping the stack's processes."""

from __future__ import annotations

import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable

import psutil

# Ports this process has handed out: the kernel may give two probes in a row the same free
# port, and the two processes told to bind it would then race (the slower one exits).
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that this process has
    not handed out before."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports."""
    return [free_port() for _ in range(count)]


def port_is_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on `port` (or holds it bound), so a server could not bind it."""
    with socket.socket() as probe:
        # As Envoy, aiohttp and grpc do: connections the last run left in TIME_WAIT are no conflict.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> str | None:
    """Who listens on TCP `port`, e.g. "pid 1234 (python3 -m http.server 8080)"; None when
    the system will not say (another user's process, or no permission to list sockets)."""
    try:
        listeners = [
            connection.pid
            for connection in psutil.net_connections(kind="tcp")
            if connection.status == psutil.CONN_LISTEN
            and connection.laddr
            and connection.laddr.port == port
            and connection.pid
        ]
    except psutil.AccessDenied:
        return None
    for pid in listeners:
        try:
            process = psutil.Process(pid)
            command = " ".join(process.cmdline()) or process.name()
        except psutil.Error:
            return f"pid {pid}"
        return f"pid {pid} ({textwrap.shorten(command, 100)})"
    return None


def wait_until_ready(
    is_ready: Callable[[], bool], process: subprocess.Popen[bytes], name: str, timeout: float
) -> None:
    """Asks `is_ready` every 0.1 s until it says yes; fails as soon as `process` exits, or
    when `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        if is_ready():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name} did not become ready")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
