"""The local stack behind `make run`: PostgreSQL (embedded via pgserver unless DATABASE_URL
is set), migrations, a demo catalog, localstripe (a Stripe emulator) behind Envoy's
fault-injecting egress listener, the gRPC server and Envoy. The tests reuse the pieces.

    python -m server.devstack            # run the stack until Ctrl-C
    python -m server.devstack token --role admin --sub alice
    python -m server.devstack card --number 4242424242424242   # a PaymentMethod id
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from server.api.auth import issue_development_token
from server.db.engine import upgrade_schema

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / ".data"
ENVOY_TEMPLATE = REPO_ROOT / "envoy.yaml"
DESCRIPTOR = REPO_ROOT / "generated" / "marketplace.binpb"
BIN_DIR = Path(sys.executable).parent
TOKEN_LIFETIME_SECONDS = 24 * 3600
# localstripe accepts any secret key of this shape; the webhook secret signs its events.
# Both are for the local emulator only (and the settings' defaults), never for Stripe.
LOCALSTRIPE_API_KEY = "sk_test_marketplace"
DEV_WEBHOOK_SECRET = "whsec_marketplace_development"  # noqa: S105
WEBHOOK_PATH = "/v1/payments:webhook"
SUCCESS_CARD = "4242424242424242"

# Fixed ids so the README's examples work exactly as written.
DEMO_PRODUCTS = (
    ("00000000-0000-4000-8000-000000000001", "MUG-CLASSIC", "Classic mug", "12.50", 100),
    ("00000000-0000-4000-8000-000000000002", "TEE-BLACK-M", "Black tee, M", "19.99", 50),
    ("00000000-0000-4000-8000-000000000003", "SNEAKER-LTD", "Limited sneaker", "180.00", 10),
    ("00000000-0000-4000-8000-000000000004", "POSTER-A2", "Poster, A2", "9.00", 200),
)


class EmbeddedPostgres:
    """A private PostgreSQL from the pgserver package, with stop/start for outage drills."""

    def __init__(self, data_dir: Path, *, delete_on_exit: bool = False) -> None:
        from pgserver.postgres_server import get_server

        data_dir.mkdir(parents=True, exist_ok=True)
        self._server = get_server(data_dir, cleanup_mode="delete" if delete_on_exit else "stop")
        self.data_dir = data_dir

    @property
    def url(self) -> str:
        uri: str = self._server.get_uri()
        return uri

    def stop(self) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-w",
                "-m",
                "fast",
                "stop",
            ],
            check=True,
            capture_output=True,
            user=self._server.system_user,
        )

    def start(self) -> None:
        self._server.ensure_postgres_running()

    def close(self) -> None:
        """Stops the server, then lets pgserver clean up (delete the data when asked to).

        pgserver alone stops a server only if no other process ever attached to it, which
        left servers running after tests; whoever owns the data directory stops it here.
        """
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()  # fails only when it is not running
        self._server.cleanup()

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def create_database(server_url: str, prefix: str) -> str:
    """A new database named `prefix` + a random suffix on `server_url`, migrated; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    upgrade_schema(url)
    return url


def drop_database(server_url: str, url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


def seed_demo_catalog(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        for product_id, sku, name, price, stock in DEMO_PRODUCTS:
            conn.execute(
                """
                INSERT INTO products (id, sku, name, description, price_currency, price_amount,
                                      stock, create_time, update_time)
                VALUES (%s, %s, %s, '', 'USD', %s, %s, now(), now())
                ON CONFLICT DO NOTHING
                """,
                (product_id, sku, name, Decimal(price), stock),
            )


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
            str(BIN_DIR / "envoy"),
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def start_server(
    env: Mapping[str, str], *, log: IO[Any] | int | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "server"],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def wait_for_grpc(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"the gRPC server on port {port} did not become healthy")


def wait_for_envoy(admin_port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"envoy exited with {process.returncode}")
        ready_url = f"http://127.0.0.1:{admin_port}/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(ready_url, timeout=1) as reply:
            if reply.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError("envoy did not become ready")


def serve_localstripe(port: int) -> None:
    """Runs localstripe on 127.0.0.1:`port` until SIGTERM, with two changes to the emulator.

    Stripe's API (2026-09-30 onwards, and the SDK pins a newer version) restricts a
    PaymentIntent to cards with `allowed_payment_method_types`; localstripe 1.15 knows only
    the older `payment_method_types` and rejects unknown parameters, so it learns the new
    name here rather than the adapter sending what real Stripe now refuses. And it pickles
    its whole store to one fixed /tmp file on every write, which concurrent emulators would
    share; every run starts empty anyway, so nothing is written.
    Its own entry point also listens on every interface; this one only on loopback.
    """
    from aiohttp import web
    from localstripe import resources
    from localstripe.server import app

    create_intent = resources.PaymentIntent.__init__

    def accept_allowed_types(
        intent: object, *args: Any, allowed_payment_method_types: Any = None, **kwargs: Any
    ) -> None:
        if allowed_payment_method_types is not None:
            kwargs["payment_method_types"] = allowed_payment_method_types
        create_intent(intent, *args, **kwargs)

    resources.PaymentIntent.__init__ = accept_allowed_types
    resources.Store.dump_to_disk = lambda store: None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    web.run_app(app, host="127.0.0.1", port=port, shutdown_timeout=1, print=None)


def start_localstripe(port: int, *, log: IO[Any] | int | None = None) -> subprocess.Popen[bytes]:
    """localstripe in its own process, empty (see serve_localstripe)."""
    return subprocess.Popen(
        [sys.executable, "-m", "server.devstack", "localstripe", "--port", str(port)],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def _localstripe_request(
    port: int, path: str, form: Mapping[str, str] | None = None, *, timeout: float = 5
) -> bytes:
    """One request to localstripe itself (not through Envoy); POST when `form` is given."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={"Authorization": f"Bearer {LOCALSTRIPE_API_KEY}"},
    )
    # S310 fears file:// and custom schemes; this URL is always http://127.0.0.1.
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
        body: bytes = reply.read()
        return body


def wait_for_localstripe(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"localstripe exited with {process.returncode}")
        with contextlib.suppress(OSError):
            _localstripe_request(port, "/v1/payment_intents?limit=1", timeout=1)
            return
        time.sleep(0.1)
    raise TimeoutError(f"localstripe on port {port} did not start")


def register_localstripe_webhook(localstripe_port: int, url: str, secret: str) -> None:
    """localstripe posts every event, signed with `secret`, to `url`."""
    _localstripe_request(
        localstripe_port, "/_config/webhooks/marketplace", {"url": url, "secret": secret}
    )


def create_test_payment_method(localstripe_port: int, card_number: str) -> str:
    """A new card PaymentMethod at localstripe; its id (pm_...)."""
    body = _localstripe_request(
        localstripe_port,
        "/v1/payment_methods",
        {
            "type": "card",
            "card[number]": card_number,
            "card[exp_month]": "12",
            "card[exp_year]": "2030",
            "card[cvc]": "123",
        },
    )
    payment_method_id: str = json.loads(body)["id"]
    return payment_method_id


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def database() -> Iterator[str]:
    if url := os.environ.get("DATABASE_URL"):
        yield url
        return
    with EmbeddedPostgres(DATA_DIR / "pgdata") as postgres:
        yield postgres.url


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run() -> int:
    # Ctrl-C and `kill` both stop the whole stack, even where SIGINT was inherited ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    grpc_port = int(os.environ.get("GRPC_PORT", "50051"))
    http_port = int(os.environ.get("HTTP_PORT", "8080"))
    admin_port = int(os.environ.get("ENVOY_ADMIN_PORT", "9901"))
    localstripe_port = int(os.environ.get("LOCALSTRIPE_PORT", "8420"))
    provider_proxy_port = int(os.environ.get("PROVIDER_PROXY_PORT", "8421"))
    webhook_secret = os.environ.get("STRIPE_WEBHOOK_SECRET", DEV_WEBHOOK_SECRET)
    secret = ensure_jwt_secret()
    DATA_DIR.mkdir(exist_ok=True)
    with database() as database_url:
        print(f"PostgreSQL: {database_url}", flush=True)
        upgrade_schema(database_url)
        seed_demo_catalog(database_url)
        config_path = DATA_DIR / "envoy.yaml"
        config_path.write_text(
            render_envoy_config(
                http_port=http_port,
                grpc_port=grpc_port,
                admin_port=admin_port,
                provider_proxy_port=provider_proxy_port,
                localstripe_port=localstripe_port,
            )
        )
        with (DATA_DIR / "localstripe.log").open("ab") as localstripe_log:
            localstripe = start_localstripe(localstripe_port, log=localstripe_log)
        try:
            wait_for_localstripe(localstripe_port, localstripe)
            register_localstripe_webhook(
                localstripe_port, f"http://127.0.0.1:{http_port}{WEBHOOK_PATH}", webhook_secret
            )
        except BaseException:
            stop_process(localstripe)
            raise
        server = start_server(
            {
                "DATABASE_URL": database_url,
                "MARKETPLACE_JWT_SECRET": secret,
                "GRPC_PORT": str(grpc_port),
                # The server reaches localstripe through Envoy, where faults can be injected.
                "STRIPE_API_BASE": f"http://127.0.0.1:{provider_proxy_port}",
                "STRIPE_API_KEY": LOCALSTRIPE_API_KEY,
                "STRIPE_WEBHOOK_SECRET": webhook_secret,
            }
        )
        with (DATA_DIR / "envoy.log").open("ab") as envoy_log:
            envoy = start_envoy(config_path, log=envoy_log)
        try:
            wait_for_grpc(grpc_port, server)
            wait_for_envoy(admin_port, envoy)
            customer = issue_development_token(
                secret, "demo-customer", ["customer"], lifetime_seconds=TOKEN_LIFETIME_SECONDS
            )
            admin = issue_development_token(
                secret, "demo-admin", ["admin"], lifetime_seconds=TOKEN_LIFETIME_SECONDS
            )
            print(
                f"\nMarketplace is up.\n"
                f"  gRPC   127.0.0.1:{grpc_port}"
                f"   (.venv/bin/grpcurl -plaintext 127.0.0.1:{grpc_port} list)\n"
                f"  REST   http://127.0.0.1:{http_port}/v1/products\n"
                f"  Envoy admin http://127.0.0.1:{admin_port}   envoy log: .data/envoy.log\n"
                f"  localstripe http://127.0.0.1:{localstripe_port}"
                f" (the server's Stripe, via Envoy on {provider_proxy_port})"
                f"   log: .data/localstripe.log\n"
                f"  a card: make card CARD={SUCCESS_CARD}\n"
                f"\n  export CUSTOMER_TOKEN={customer}\n"
                f"  export ADMIN_TOKEN={admin}\n"
                f"\nCtrl-C stops everything.\n",
                flush=True,
            )
            while all(p.poll() is None for p in (server, envoy, localstripe)):
                time.sleep(0.5)
            print("a component exited; stopping", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping...", flush=True)
            return 0
        finally:
            stop_process(envoy)
            stop_process(server)
            stop_process(localstripe)


def print_token(role: str, subject: str) -> int:
    roles = [r for r in role.replace(",", " ").split() if r]
    print(
        issue_development_token(
            ensure_jwt_secret(), subject, roles, lifetime_seconds=TOKEN_LIFETIME_SECONDS
        )
    )
    return 0


def print_card(number: str) -> int:
    port = int(os.environ.get("LOCALSTRIPE_PORT", "8420"))
    try:
        print(create_test_payment_method(port, number))
    except OSError as error:
        print(f"localstripe on port {port} did not answer ({error}); is `make run` up?")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command")
    token = commands.add_parser("token", help="print a development JWT")
    token.add_argument(
        "--role", default="customer", help="customer, admin, or both: 'customer,admin'"
    )
    token.add_argument("--sub", default="demo-customer", help="the customer id")
    card = commands.add_parser(
        "card", help="print a new PaymentMethod id from the running localstripe"
    )
    card.add_argument(
        "--number",
        default=SUCCESS_CARD,
        help="a Stripe test card: 4242424242424242 pays, 4000000000000341 is declined",
    )
    emulator = commands.add_parser("localstripe", help="run localstripe (used by `make run`)")
    emulator.add_argument("--port", type=int, default=8420)
    options = parser.parse_args()
    if options.command == "token":
        return print_token(options.role, options.sub)
    if options.command == "card":
        return print_card(options.number)
    if options.command == "localstripe":
        serve_localstripe(options.port)
        return 0
    return run()


if __name__ == "__main__":
    raise SystemExit(main())
