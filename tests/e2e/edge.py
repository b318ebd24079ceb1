"""An Envoy of a test's own, rendered from envoy.yaml as the stack's is, in front of the
stack's server (or of a port nobody serves): for the edge's answers a test must provoke
without disturbing the shared Envoy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from devstack.envoy import render_envoy_config, start_envoy, wait_for_envoy
from devstack.processes import free_port, stop_process


@contextlib.contextmanager
def own_envoy(grpc_port: int, scratch: Path) -> Iterator[str]:
    """Envoy's REST listener in front of `grpc_port`; yields its base URL."""
    http_port, admin_port = free_port(), free_port()
    config = scratch / "envoy.yaml"
    config.write_text(
        render_envoy_config(
            http_port=http_port,
            grpc_port=grpc_port,
            admin_port=admin_port,
            provider_proxy_port=free_port(),
            localstripe_port=free_port(),
        )
    )
    with (scratch / "envoy.log").open("wb") as log:
        envoy = start_envoy(config, log=log)
    try:
        wait_for_envoy(admin_port, envoy)
        yield f"http://127.0.0.1:{http_port}"
    finally:
        stop_process(envoy)
