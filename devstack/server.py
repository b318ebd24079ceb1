"""The server as its own process (`python -m server`), and its development JWT secret."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack import DATA_DIR, REPO_ROOT
from devstack.processes import wait_until_ready


def ensure_jwt_secret(data_dir: Path = DATA_DIR) -> str:
    """MARKETPLACE_JWT_SECRET, or a development secret kept under .data/."""
    if secret := os.environ.get("MARKETPLACE_JWT_SECRET"):
        return secret
    path = data_dir / "jwt-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def start_server(
    env: Mapping[str, str], *, log: IO[Any] | int | None = None
) -> subprocess.Popen[bytes]:
    """`python -m server` with this environment on top of ours."""
    return subprocess.Popen(
        [sys.executable, "-m", "server"],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def wait_for_grpc(
    port: int,
    process: subprocess.Popen[bytes],
    timeout: float = 30,
    *,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Until the server on `port` reports SERVING through the standard health service;
    `credentials` for a server that serves TLS."""
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def is_serving() -> bool:
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
            return False

        wait_until_ready(is_serving, process, f"the gRPC server on port {port}", timeout)
