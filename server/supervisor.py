"""SERVER_WORKERS=N: N server processes share the gRPC port through SO_REUSEPORT (the
pattern of grpc's multiprocessing example), under one supervisor that starts them,
restarts one that dies, and passes SIGTERM on so each drains its in-flight calls.

Python runs one core per process, so this is how one machine's cores all serve. Every
worker is a complete server (own pool, own health task): nothing is shared but the port and
the database, which is also how replicas on several machines behave. With OUTBOX_RELAY=process
(the default) the outbox relay is one more supervised process, at a lower CPU priority
(server/relay_process.py), rather than a task in every worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from server.observability import configure_logging
from server.settings import Settings

WORKER_ENV = "MARKETPLACE_WORKER_INDEX"
# Set for the outbox relay's own process (OUTBOX_RELAY=process, server/relay_process.py).
RELAY_ENV = "MARKETPLACE_RELAY_PROCESS"
# The relay's key among the supervised processes; workers are 0..N-1.
_RELAY = -1
# The supervisor's pid, so a child can tell whether it outlived it (follow_supervisor).
SUPERVISOR_PID_ENV = "MARKETPLACE_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1  # prctl(2)
# prometheus-client's own variable: where every process of one server writes its metric files.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_RESTART_BACKOFF_SECONDS = 1.0
_log = structlog.get_logger("marketplace.supervisor")


def _port_is_free(host: str, port: int) -> bool:
    """Without SO_REUSEPORT, so a stale server holding the port is noticed, not joined."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _remove_metric_files(folder: Path) -> None:
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)


@contextlib.contextmanager
def metrics_folder() -> Iterator[Path]:
    """The folder of this run's metric files: PROMETHEUS_MULTIPROC_DIR, emptied of them at
    the start (a crashed run's counts would otherwise be added in) and at the end; without
    it, a temporary folder removed at the end. Only a SIGKILL leaves the temporary one."""
    if given := os.environ.get(METRICS_DIR_ENV):
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        _remove_metric_files(folder)
        try:
            yield folder
        finally:
            _remove_metric_files(folder)
        return
    with tempfile.TemporaryDirectory(prefix="marketplace-metrics-") as scratch:
        yield Path(scratch)


def follow_supervisor() -> None:
    """Asks the kernel to SIGTERM this worker or relay process when its supervisor dies, so
    a SIGKILLed supervisor does not leave its children serving on the shared port (and the
    next `make run` refused with "port in use"); they drain and exit as on a stop. Linux
    only (prctl); elsewhere a killed supervisor's children are left to the operator."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        _log.warning("cannot follow the supervisor", errno=ctypes.get_errno())
        return
    # The supervisor may have died before the request was made: then nobody will signal.
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if supervisor is not None and str(os.getppid()) != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    def __init__(self, settings: Settings, workers: int) -> None:
        self._settings = settings
        self._workers = workers
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False

    def _spawn(self, index: int, metrics_dir: Path) -> None:
        role = {RELAY_ENV: "1"} if index == _RELAY else {WORKER_ENV: str(index)}
        env = {
            **os.environ,
            **role,
            METRICS_DIR_ENV: str(metrics_dir),
            SUPERVISOR_PID_ENV: str(os.getpid()),
        }
        self._processes[index] = subprocess.Popen([sys.executable, "-m", "server"], env=env)
        pid = self._processes[index].pid
        if index == _RELAY:
            _log.info("outbox relay started", pid=pid)
        else:
            _log.info("worker started", worker=index, pid=pid)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        settings = self._settings
        if not _port_is_free(settings.grpc_host, settings.grpc_port):
            _log.error("port in use", address=f"{settings.grpc_host}:{settings.grpc_port}")
            return 1
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        with metrics_folder() as metrics_dir:
            return self._supervise(metrics_dir)

    def _supervise(self, metrics_dir: Path) -> int:
        settings = self._settings
        if settings.metrics_port:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
            start_http_server(settings.metrics_port, addr=settings.grpc_host, registry=registry)
        for index in range(self._workers):
            self._spawn(index, metrics_dir)
        if settings.outbox_relay == "process":
            self._spawn(_RELAY, metrics_dir)
        failed = False
        while self._processes:
            time.sleep(0.2)
            for index, process in list(self._processes.items()):
                code = process.poll()
                if code is None:
                    continue
                mark_process_dead(process.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                del self._processes[index]
                if self._stopping:
                    # -SIGTERM: stopped while still starting up, before it could serve.
                    failed = failed or code not in (0, -signal.SIGTERM)
                    continue
                _log.error(
                    "worker died; restarting",
                    worker="outbox relay" if index == _RELAY else index,
                    exit_code=code,
                )
                time.sleep(_RESTART_BACKOFF_SECONDS)
                if not self._stopping:
                    self._spawn(index, metrics_dir)
        _log.info("all workers stopped")
        return 1 if failed else 0


def main() -> None:
    settings = Settings()  # type: ignore[call-arg]  # fields come from the environment
    workers = settings.server_workers or os.cpu_count() or 1
    if os.environ.get(RELAY_ENV) is not None:
        from server.relay_process import main as relay_only

        follow_supervisor()
        relay_only(settings)
        return
    if os.environ.get(WORKER_ENV) is not None:
        from server.app import main as serve_one

        follow_supervisor()
        serve_one(settings, reuse_port=True, with_relay=settings.outbox_relay == "worker")
        return
    if workers == 1:
        from server.app import main as serve_one

        # Its metrics are its own registry's; with PROMETHEUS_MULTIPROC_DIR set, it still
        # writes metric files there, which are its own to clear. It runs its own relay:
        # one process is the whole server.
        with metrics_folder() if os.environ.get(METRICS_DIR_ENV) else contextlib.nullcontext():
            serve_one(settings, reuse_port=False)
        return
    configure_logging(settings.log_level, settings.log_format)
    raise SystemExit(Supervisor(settings, workers).run())
