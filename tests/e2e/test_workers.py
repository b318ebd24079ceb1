"""SERVER_WORKERS: several processes share the port under one supervisor."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest

from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from tests.conftest import insert_product, notification_queue_held
from tests.stack import server_env

pytestmark = pytest.mark.e2e


def _workers(supervisor_pid: int) -> list[psutil.Process]:
    return psutil.Process(supervisor_pid).children()


def _queue_usage(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        exposition = r.read().decode()
    [line] = [
        line
        for line in exposition.splitlines()
        if line.startswith("marketplace_notification_queue_usage ")
    ]
    return float(line.rsplit(" ", 1)[1])


def _queue_usage_is_reported(database_url: str, metrics_port: int) -> None:
    """A listener stalled in a transaction holds PostgreSQL's notification queue; the
    workers' heartbeats (every 5 s) report it. The gauge reads 0 until someone sets it, so
    only a rise shows that the listener's readings reach /metrics."""
    with notification_queue_held(database_url):
        deadline = time.monotonic() + 20
        while _queue_usage(metrics_port) <= 0.0:
            assert time.monotonic() < deadline, "queue usage never reached /metrics"
            time.sleep(0.5)


def test_a_dead_worker_is_replaced_and_metrics_cover_all_workers(
    database_url: str, tmp_path: Path
) -> None:
    product_id = insert_product(database_url, stock=1)
    port, metrics_port = free_port(), free_port()
    env = {
        **server_env(database_url, port),
        "SERVER_WORKERS": "2",
        "METRICS_PORT": str(metrics_port),
    }
    with (tmp_path / "server.log").open("wb") as log:
        server = start_server(env, log=log)
    try:
        wait_for_grpc(port, server)
        deadline = time.monotonic() + 20
        while len(_workers(server.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        first_workers = _workers(server.pid)
        assert len(first_workers) == 2

        first_workers[0].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids = {p.pid for p in _workers(server.pid)}
            if len(pids) == 2 and first_workers[0].pid not in pids:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the killed worker was not replaced")

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for _ in range(20):
                reply = stub.GetProduct(catalog_pb2.GetProductRequest(id=product_id), timeout=10)
                assert reply.product.id == product_id

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            exposition = r.read().decode()
        served = [
            line
            for line in exposition.splitlines()
            if line.startswith("marketplace_rpc_total{")
            and "GetProduct" in line
            and 'code="OK"' in line
        ]
        assert served, exposition[:2000]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in served) >= 20
        _queue_usage_is_reported(database_url, metrics_port)
    finally:
        assert stop_process(server) == 0
