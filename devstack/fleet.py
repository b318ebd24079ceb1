"""Server replicas: independent `python -m server` processes on one database, each on its
own gRPC port (and /metrics port), all behind Envoy's marketplace_grpc cluster
(docs/operations.md#the-fleet-on-one-machine)."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from devstack.processes import stop_process
from devstack.server import start_server


@dataclasses.dataclass
class Replica:
    number: int
    grpc_port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    # Whether make run has said that it exited.
    reported: bool = False


class Fleet:
    """Starts, watches and stops replicas. Replica `n` listens on `grpc_port + n - 1` and
    serves /metrics on `metrics_port + n - 1` (none when `metrics_port` is 0), unless
    `free_ports` picks its ports; its workers' metric files are its own folder's."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        grpc_port: int,
        metrics_port: int,
        metrics_dir: Path,
        log_dir: Path | None = None,
        free_ports: Callable[[], int] | None = None,
    ) -> None:
        self._env = dict(env)
        self._grpc_port = grpc_port
        self._metrics_port = metrics_port
        self._metrics_dir = metrics_dir
        self._log_dir = log_dir
        self._free_ports = free_ports
        self.replicas: list[Replica] = []

    def start_replica(self, *, grpc_port: int | None = None) -> Replica:
        """The next replica, on `grpc_port` when given (a port Envoy already lists)."""
        number = len(self.replicas) + 1
        if self._free_ports is not None:
            metrics_port = self._free_ports() if self._metrics_port else 0
            grpc_port = self._free_ports() if grpc_port is None else grpc_port
        else:
            metrics_port = self._metrics_port + number - 1 if self._metrics_port else 0
            grpc_port = self._grpc_port + number - 1 if grpc_port is None else grpc_port
        # Replica 1's folder is the one a single server has always used.
        metrics_dir = self._metrics_dir
        if number > 1:
            metrics_dir = self._metrics_dir.with_name(f"{self._metrics_dir.name}-{number}")
        env = {
            **self._env,
            "GRPC_PORT": str(grpc_port),
            "METRICS_PORT": str(metrics_port),
            # Under the data folder, so even a killed run's files are found (and cleared)
            # by the next one instead of piling up in /tmp.
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        if self._log_dir is None:
            process = start_server(env)
        else:
            with (self._log_dir / f"server-{number}.log").open("ab") as log:
                process = start_server(env, log=log)
        replica = Replica(number, grpc_port, metrics_port, process)
        self.replicas.append(replica)
        return replica

    def live(self) -> list[Replica]:
        return [replica for replica in self.replicas if replica.process.poll() is None]

    def watch(self) -> bool:
        """Says once of each replica that it exited; whether any still runs."""
        for replica in self.replicas:
            code = replica.process.poll()
            if code is not None and not replica.reported:
                replica.reported = True
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
                print(
                    f"replica {replica.number} (pid {replica.process.pid}, port"
                    f" {replica.grpc_port}) exited with {how}",
                    file=sys.stderr,
                    flush=True,
                )
        return bool(self.live())

    def kill(self, replica: Replica) -> None:
        """SIGKILL, as a crash: no NOT_SERVING, no draining."""
        replica.process.kill()
        replica.process.wait()

    def stop(self) -> dict[int, int]:
        """SIGTERM to every replica at once (each drains), then waits for all; each replica's
        exit code by number."""
        for replica in self.live():
            replica.process.send_signal(signal.SIGTERM)
        return {replica.number: stop_process(replica.process) for replica in self.replicas}
