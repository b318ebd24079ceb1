"""SERVER_WORKERS: several processes share the port under one supervisor."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest

from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from server.devstack import free_port, start_server, stop_process, wait_for_grpc
from tests.conftest import insert_product
from tests.e2e.conftest import server_env

pytestmark = pytest.mark.e2e


def _workers(supervisor_pid: int) -> list[psutil.Process]:
    return psutil.Process(supervisor_pid).children()


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
        # Every worker's product-change listener reports the notification queue's usage.
        usage = [
            line
            for line in exposition.splitlines()
            if line.startswith("marketplace_notification_queue_usage ")
        ]
        assert usage, exposition[:2000]
        assert 0.0 <= float(usage[0].rsplit(" ", 1)[1]) < 1.0
    finally:
        assert stop_process(server) == 0
