"""The development stack as a new user meets it: `python -m devstack` (make run) in its own
process group, stopped with Ctrl-C's SIGINT, on free ports and a data folder in tmp (never the
repository's .data/ or the ports a developer's `make run` holds); `make token`, `make card`."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devstack import REPO_ROOT
from devstack.__main__ import STACK_PORTS
from devstack.localstripe import SUCCESS_CARD, create_test_payment_method, start_localstripe
from devstack.localstripe import wait_for_localstripe as wait_for_emulator
from devstack.postgres import DEMO_PRODUCTS
from devstack.processes import free_port, free_ports, stop_process

pytestmark = pytest.mark.e2e

_STARTUP_SECONDS = 90
# What a clean start and stop must not print: pgserver's failed `pg_ctl stop` and "killing it
# instead", tracebacks, warnings, and log lines at warning level or above.
_ALARMING = re.compile(
    r"(?i)traceback|failed|killing|warning|exited with|\"level\": \"(warning|error|critical)\""
)
_MUG = DEMO_PRODUCTS[0][0]


def _environment(data_dir: Path, **extra: str) -> dict[str, str]:
    """Ours, less anything that would point the stack at something real, plus `extra`."""
    inherited = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "MARKETPLACE_JWT_SECRET", "STRIPE_WEBHOOK_SECRET"}
        and key not in STACK_PORTS
    }
    return {**inherited, "DEVSTACK_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra}


def _devstack(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=_STARTUP_SECONDS,
        check=False,
    )


@dataclass
class Run:
    """One run of the stack: its process and everything it printed."""

    process: subprocess.Popen[bytes]
    output: Path

    @property
    def printed(self) -> str:
        return self.output.read_text()

    def token(self, role: str) -> str:
        [token] = re.findall(rf"export {role.upper()}_TOKEN=(\S+)", self.printed)
        return token

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + _STARTUP_SECONDS
        while "Marketplace is up." not in self.printed:
            assert self.process.poll() is None, self.printed
            assert time.monotonic() < deadline, self.printed
            time.sleep(0.2)

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the whole process group, as a terminal sends it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise


@dataclass
class DevStack:
    """`python -m devstack` on its own free ports and data folder, as often as asked."""

    data_dir: Path
    ports: dict[str, int]

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.ports['HTTP_PORT']}"

    @contextlib.contextmanager
    def running(self, output: Path) -> Iterator[Run]:
        """The stack until the block ends, then Ctrl-C."""
        # Two workers whatever the machine: the supervisor and its metrics folder take part.
        ports = {name: str(port) for name, port in self.ports.items()}
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "devstack"],
                cwd=REPO_ROOT,
                env=_environment(self.data_dir, SERVER_WORKERS="2", **ports),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run = Run(process, output)
        try:
            run.wait_until_up()
            yield run
        finally:
            run.interrupt()


@pytest.fixture
def devstack(tmp_path: Path) -> DevStack:
    ports = free_ports(len(STACK_PORTS))
    return DevStack(tmp_path / "data", dict(zip(STACK_PORTS, ports, strict=True)))


@pytest.mark.parametrize("variable", list(STACK_PORTS))
def test_a_taken_port_is_named_before_anything_starts(
    devstack: DevStack, tmp_path: Path, variable: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {name: str(number) for name, number in devstack.ports.items()}
        env = _environment(devstack.data_dir, **{**ports, variable: str(port)})
        run = _devstack(env=env)

    assert run.returncode != 0
    assert f"port {port} ({variable}, " in run.stderr, run.stderr + run.stdout
    assert f"held by pid {os.getpid()} (" in run.stderr
    assert "nothing was started" in run.stderr
    assert not devstack.data_dir.exists(), "something was started before the port was checked"


def test_a_clean_stop_prints_nothing_alarming(devstack: DevStack, tmp_path: Path) -> None:
    with devstack.running(tmp_path / "run.log") as run:
        pass

    assert run.process.returncode == 0, run.printed
    assert not _ALARMING.search(run.printed), run.printed
    assert "stopping..." in run.printed


def test_a_payment_made_before_a_restart_is_refundable_after_it(
    devstack: DevStack, tmp_path: Path
) -> None:
    with devstack.running(tmp_path / "first.log") as first, httpx.Client(timeout=30) as client:
        customer = {"authorization": f"Bearer {first.token('customer')}"}
        placed = client.post(
            f"{devstack.rest}/v1/orders",
            json={"requestId": str(uuid.uuid4()), "items": [{"productId": _MUG, "quantity": 1}]},
            headers=customer,
        )
        assert placed.status_code == 200, placed.text
        order_id = placed.json()["order"]["id"]
        card = create_test_payment_method(devstack.ports["LOCALSTRIPE_PORT"], SUCCESS_CARD)
        paid = client.post(
            f"{devstack.rest}/v1/orders/{order_id}/payments",
            json={"requestId": str(uuid.uuid4()), "paymentMethod": card},
            headers=customer,
        )
        assert paid.status_code == 200, paid.text
        assert paid.json()["payment"]["status"] == "PAYMENT_STATUS_SUCCEEDED"
        payment_id = paid.json()["payment"]["id"]
    assert first.process.returncode == 0, first.printed

    with devstack.running(tmp_path / "second.log") as second, httpx.Client(timeout=30) as client:
        refunded = client.post(
            f"{devstack.rest}/v1/payments/{payment_id}:refund",
            json={"requestId": str(uuid.uuid4()), "reason": "after a restart"},
            headers={"authorization": f"Bearer {second.token('admin')}"},
        )
        assert refunded.status_code == 200, refunded.text
        assert refunded.json()["payment"]["status"] == "PAYMENT_STATUS_REFUNDED"
        order = client.get(f"{devstack.rest}/v1/orders/{order_id}", headers=customer)
        assert order.json()["order"]["status"] == "ORDER_STATUS_REFUNDED", order.text
    assert second.process.returncode == 0, second.printed
    assert (devstack.data_dir / "localstripe.pickle").exists()


@pytest.fixture
def localstripe_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    with (tmp_path / "localstripe.log").open("wb") as log:
        emulator = start_localstripe(port, log=log)
    try:
        wait_for_emulator(port, emulator)
        yield port
    finally:
        stop_process(emulator)


def test_a_refused_card_is_reported_as_refused_with_localstripe_s_reason(
    localstripe_port: int, tmp_path: Path
) -> None:
    env = _environment(tmp_path / "data", LOCALSTRIPE_PORT=str(localstripe_port))

    refused = _devstack("card", "--number", "1234", env=env)
    accepted = _devstack("card", "--number", SUCCESS_CARD, env=env)

    assert refused.returncode == 1
    assert refused.stdout == ""
    assert "localstripe refused the card 1234: Bad request" in refused.stderr, refused.stderr
    assert "did not answer" not in refused.stderr
    assert (accepted.returncode, accepted.stdout[:3]) == (0, "pm_"), accepted.stderr


def test_a_token_for_an_unknown_role_is_refused(tmp_path: Path) -> None:
    env = _environment(tmp_path / "data")

    bogus = _devstack("token", "--role", "bogus", env=env)
    both = _devstack("token", "--role", "customer,admin", env=env)

    assert bogus.returncode == 1
    assert bogus.stdout == ""
    assert "unknown role 'bogus': the roles are customer, admin" in bogus.stderr, bogus.stderr
    assert (both.returncode, both.stdout.count(".")) == (0, 2), both.stderr
