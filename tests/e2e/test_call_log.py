"""The server's one log line per call."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from tests.stack import server_env

pytestmark = pytest.mark.e2e


def rpc_lines(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text(errors="replace").splitlines()
    return [
        entry
        for entry in (json.loads(line) for line in lines if line.startswith("{"))
        if entry.get("event") == "rpc"
    ]


def test_passing_health_checks_stay_out_of_the_info_log_other_calls_do_not(
    database_url: str, tmp_path: Path
) -> None:
    """Gateways and probes check health every second per replica: logged at INFO, those
    lines would bury every call a person looks for."""
    port = free_port()
    env = {**server_env(database_url, port), "LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}
    log = tmp_path / "server.log"
    health_id, read_id = f"health-{uuid.uuid4()}", f"read-{uuid.uuid4()}"
    with log.open("wb") as output:
        server = start_server(env, log=output)
        try:
            wait_for_grpc(port, server)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(),
                    metadata=(("x-request-id", health_id),),
                    timeout=10,
                )
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                catalog_pb2_grpc.CatalogServiceStub(channel).ListProducts(
                    catalog_pb2.ListProductsRequest(page_size=1),
                    metadata=(("x-request-id", read_id),),
                    timeout=10,
                )
        finally:
            stop_process(server)  # its log is whole once it has exited

    ids = {line.get("request_id") for line in rpc_lines(log)}
    assert read_id in ids
    assert health_id not in ids
