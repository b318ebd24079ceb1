"""SERVER_WORKERS: several processes share the port under one supervisor."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import nats
import psutil
import pytest

from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from server.events.nats import DEAD_LETTER_STREAM, DEAD_LETTER_SUBJECT_PREFIX, ensure_streams
from server.supervisor import RELAY_ENV
from tests.conftest import Tokens, insert_product, notification_queue_held
from tests.e2e.payment_checks import query
from tests.stack import bearer, running_nats, server_env, serving_workers, supervised

pytestmark = pytest.mark.e2e


def _exposition(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        return r.read().decode()


def _served(metrics_port: int, method: str) -> float:
    """How many calls of `method` /metrics counts as answered OK."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in _exposition(metrics_port).splitlines()
        if line.startswith("marketplace_rpc_total{") and method in line and 'code="OK"' in line
    )


def _gauge(metrics_port: int, name: str) -> float:
    """An unlabelled gauge's value on /metrics (the supervisor's merge of the workers')."""
    [line] = [
        line for line in _exposition(metrics_port).splitlines() if line.startswith(name + " ")
    ]
    return float(line.rsplit(" ", 1)[1])


def _queue_usage_is_reported(database_url: str, metrics_port: int) -> None:
    """A listener stalled in a transaction holds PostgreSQL's notification queue; the
    workers' heartbeats (every 5 s) report it. The gauge reads 0 until someone sets it, so
    only a rise shows that the listener's readings reach /metrics."""
    with notification_queue_held(database_url):
        deadline = time.monotonic() + 20
        while _gauge(metrics_port, "marketplace_notification_queue_usage") <= 0.0:
            assert time.monotonic() < deadline, "queue usage never reached /metrics"
            time.sleep(0.5)


def test_a_dead_worker_is_replaced_and_metrics_cover_allserving_workers(
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
        while len(serving_workers(server.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        first_workers = serving_workers(server.pid)
        assert len(first_workers) == 2

        first_workers[0].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids = {p.pid for p in serving_workers(server.pid)}
            if len(pids) == 2 and first_workers[0].pid not in pids:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the killed worker was not replaced")

        _get_products(port, product_id, 20)
        assert _served(metrics_port, "GetProduct") >= 20, _exposition(metrics_port)[:2000]
        # The lowest of the workers' readings: the replacement's own probe must have run.
        deadline = time.monotonic() + 20
        while _gauge(metrics_port, "marketplace_database_up") != 1.0:
            assert time.monotonic() < deadline, "marketplace_database_up never read 1"
            time.sleep(0.5)
        _queue_usage_is_reported(database_url, metrics_port)
    finally:
        assert stop_process(server) == 0


def _get_products(port: int, product_id: str, times: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        for _ in range(times):
            reply = stub.GetProduct(catalog_pb2.GetProductRequest(id=product_id), timeout=10)
            assert reply.product.id == product_id


def _supervised(database_url: str, scratch: Path, **extra: str) -> tuple[dict[str, str], int]:
    """Two workers' environment with TMPDIR at `scratch`, and its metrics port."""
    port, metrics_port = free_port(), free_port()
    env = {
        **server_env(database_url, port),
        "SERVER_WORKERS": "2",
        "METRICS_PORT": str(metrics_port),
        "TMPDIR": str(scratch),
        **extra,
    }
    return env, metrics_port


def _until_dead(processes: list[psutil.Process]) -> None:
    """Until each has died (a zombie nobody reaped yet has let go of its sockets too)."""

    def dead(process: psutil.Process) -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 10
    while not all(dead(process) for process in processes):
        assert time.monotonic() < deadline, "a killed worker lives on"
        time.sleep(0.1)


def _metrics_folders(scratch: Path) -> list[Path]:
    return sorted(scratch.glob("marketplace-metrics-*"))


def test_a_clean_stop_leaves_no_metrics_folder_behind(database_url: str, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env, _ = _supervised(database_url, scratch)
    with (tmp_path / "server.log").open("wb") as log:
        server = start_server(env, log=log)
    try:
        wait_for_grpc(int(env["GRPC_PORT"]), server)
        assert len(_metrics_folders(scratch)) == 1
    finally:
        assert stop_process(server) == 0
    assert _metrics_folders(scratch) == []


def test_a_killed_supervisor_s_metric_files_are_cleared_by_the_next_one(
    database_url: str, tmp_path: Path
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (make run's is under .data/), even a SIGKILL leaves
    nothing in /tmp, and the next supervisor does not add the dead run's counts to its own."""
    product_id = insert_product(database_url, stock=1)
    scratch, metrics_dir = tmp_path / "tmp", tmp_path / "metrics"
    scratch.mkdir()
    env, metrics_port = _supervised(
        database_url, scratch, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)
    )
    port = int(env["GRPC_PORT"])
    with (tmp_path / "killed.log").open("wb") as log:
        killed = start_server(env, log=log)
    wait_for_grpc(port, killed)
    _get_products(port, product_id, 10)
    assert _served(metrics_port, "GetProduct") >= 10
    # The workers and the outbox relay's process stop with it (follow_supervisor).
    children = psutil.Process(killed.pid).children()
    killed.kill()
    killed.wait()
    _until_dead(children)
    assert _metrics_folders(scratch) == []
    assert list(metrics_dir.glob("*.db")), "the killed run wrote no metric files"

    with (tmp_path / "next.log").open("wb") as log:
        server = start_server(env, log=log)
    try:
        wait_for_grpc(port, server)
        assert _served(metrics_port, "GetProduct") == 0
    finally:
        assert stop_process(server) == 0
    assert list(metrics_dir.glob("*.db")) == []


def test_a_killed_supervisor_s_workers_and_relay_stop_with_it(
    database_url: str, tmp_path: Path
) -> None:
    """Left behind, they would go on serving on the shared port, and the next server would
    refuse to start on it ("port in use")."""
    product_id = insert_product(database_url, stock=1)
    env, _ = _supervised(database_url, tmp_path)
    port = int(env["GRPC_PORT"])
    with (tmp_path / "killed.log").open("wb") as log:
        killed = start_server(env, log=log)
    wait_for_grpc(port, killed)
    children = serving_workers(killed.pid) + _relay_processes(killed.pid)
    assert len(children) == 3, children
    killed.kill()
    killed.wait()
    _until_dead(children)

    with (tmp_path / "next.log").open("wb") as log:
        server = start_server(env, log=log)
    try:
        wait_for_grpc(port, server)
        _get_products(port, product_id, 1)
    finally:
        assert stop_process(server) == 0


def _relay_processes(supervisor_pid: int) -> list[psutil.Process]:
    return supervised(supervisor_pid, RELAY_ENV)


def _order_published(database_url: str, port: int, token: str, product_id: str) -> None:
    """Places an order and waits until the relay has published its order.created."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = order_pb2_grpc.OrderServiceStub(channel).CreateOrder(
            order_pb2.CreateOrderRequest(
                request_id=str(uuid.uuid4()),
                items=[order_pb2.OrderItem(product_id=product_id, quantity=1)],
            ),
            metadata=bearer(token),
            timeout=10,
        )
    deadline = time.monotonic() + 30
    while not query(
        database_url,
        "SELECT 1 FROM outbox WHERE aggregate_id = %s AND publish_time IS NOT NULL",
        reply.order.id,
    ):
        assert time.monotonic() < deadline, f"order {reply.order.id}'s event never published"
        time.sleep(0.2)


async def _a_dead_letter_waiting(url: str, consumer: str) -> None:
    client = await nats.connect(url)
    try:
        jetstream = client.jetstream()
        await ensure_streams(jetstream)
        await jetstream.publish(
            DEAD_LETTER_SUBJECT_PREFIX + consumer, b"{}", stream=DEAD_LETTER_STREAM
        )
    finally:
        await client.close()


def test_the_outbox_relay_runs_in_a_niced_process_of_its_own_and_is_replaced(
    own_database: str, tokens: Tokens, tmp_path: Path
) -> None:
    """It also counts dead letters, which the workers no longer do."""
    product_id = insert_product(own_database, stock=10)
    with running_nats(tmp_path) as nats_server:
        asyncio.run(_a_dead_letter_waiting(nats_server.url, "notifications"))
        env, metrics_port = _supervised(own_database, tmp_path, NATS_URL=nats_server.url)
        port = int(env["GRPC_PORT"])
        with (tmp_path / "server.log").open("wb") as log:
            server = start_server(env, log=log)
        try:
            wait_for_grpc(port, server)
            deadline = time.monotonic() + 20
            while len(_relay_processes(server.pid)) != 1:
                assert time.monotonic() < deadline, "no outbox relay process"
                time.sleep(0.1)
            [relay] = _relay_processes(server.pid)
            # OUTBOX_RELAY_NICE's default, 19, above the runner's own (nice stops at 19).
            assert relay.nice() == min(psutil.Process().nice() + 19, 19)
            assert {worker.nice() for worker in serving_workers(server.pid)} == {
                psutil.Process().nice()
            }
            token = tokens.customer("relay-process")
            _order_published(own_database, port, token, product_id)
            # Its metrics reach the supervisor's /metrics, as the workers' do.
            assert _gauge(metrics_port, "marketplace_outbox_published_total") >= 1
            deadline = time.monotonic() + 20
            waiting = 'marketplace_dead_letters{consumer="notifications"} 1.0'
            while waiting not in _exposition(metrics_port).splitlines():
                assert time.monotonic() < deadline, "the dead letter was never counted"
                time.sleep(0.2)

            relay.send_signal(signal.SIGKILL)
            deadline = time.monotonic() + 20
            while [p.pid for p in _relay_processes(server.pid)] in ([], [relay.pid]):
                assert time.monotonic() < deadline, "the killed relay was not replaced"
                time.sleep(0.1)
            # The new one takes the lead once the old one's session, and its lock, are gone.
            _order_published(own_database, port, token, product_id)
        finally:
            assert stop_process(server) == 0, (tmp_path / "server.log").read_text()[-3000:]
