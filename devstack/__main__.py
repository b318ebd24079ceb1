"""`python -m devstack`: the stack behind `make run`, `make token` and `make card`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

import devstack
from devstack import DATA_DIR
from devstack.envoy import render_envoy_config, start_envoy, wait_for_envoy
from devstack.fleet import Fleet
from devstack.localstripe import (
    DECLINED_CARD,
    DEV_WEBHOOK_SECRET,
    LOCALSTRIPE_API_KEY,
    SUCCESS_CARD,
    WEBHOOK_PATH,
    CardRefused,
    create_test_payment_method,
    register_localstripe_webhook,
    serve_localstripe,
    start_localstripe,
    wait_for_localstripe,
)
from devstack.mail import MAIL_DIR, start_mail_sink, wait_for_mail_sink
from devstack.nats import ROUTE_PORT_OFFSET, nats_url, start_nats, wait_for_nats
from devstack.postgres import database, database_with_replica, seed_demo_catalog
from devstack.processes import port_holder, port_is_taken, stop_process
from devstack.server import ensure_jwt_secret, wait_for_grpc
from devstack.stripejs import teach_payment_methods
from devstack.tls import SERVER_TLS_SETTINGS, TlsFiles, ensure_development_tls
from devstack.warehouse import (
    STATE_FILE,
    seed_demo_warehouse,
    ship_delay_from_environment,
    start_warehouse,
)
from devstack.web import dev_token_endpoint, development_email
from server.api.auth import issue_development_token
from server.db.engine import upgrade_schema
from server.domain.identity import Role

TOKEN_LIFETIME_SECONDS = 24 * 3600


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# Every port the stack listens on: the variable that moves it, its default, what listens there.
STACK_PORTS = {
    "GRPC_PORT": (50051, "the gRPC server"),
    "HTTP_PORT": (8080, "Envoy's REST listener"),
    "ENVOY_ADMIN_PORT": (9901, "Envoy's admin interface"),
    "METRICS_PORT": (9464, "the server's Prometheus /metrics; 0 turns it off"),
    "LOCALSTRIPE_PORT": (8420, "localstripe"),
    "PROVIDER_PROXY_PORT": (8421, "Envoy's listener in front of localstripe"),
    "SMTP_PORT": (1025, "the SMTP sink keeping the server's emails (make mail)"),
    "NATS_PORT": (4222, "nats-server with JetStream (make events)"),
}


def _port(name: str) -> int:
    return int(os.environ.get(name, str(STACK_PORTS[name][0])))


def _shown(path: Path) -> str:
    """`path` as the banner shows it: relative to where `make run` runs, when it is below it."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _nats_ports(ports: dict[str, int], nodes: int) -> dict[str, int]:
    """A NATS cluster's ports beyond NATS_PORT: each node's client port (NATS_PORT+1, ...)
    and every node's route port (its client port + ROUTE_PORT_OFFSET)."""
    if nodes < 2:
        return {}
    extra = {f"NATS_PORT+{index}": ports["NATS_PORT"] + index for index in range(1, nodes)}
    for index in range(nodes):
        extra[f"NATS_ROUTE+{index}"] = ports["NATS_PORT"] + index + ROUTE_PORT_OFFSET
    return extra


def _replica_ports(ports: dict[str, int], replicas: int) -> dict[str, int]:
    """The ports of replicas 2..N, each the one before it plus one: GRPC_PORT+1, METRICS_PORT+1
    and so on (replica 1 has GRPC_PORT and METRICS_PORT themselves)."""
    extra = {}
    for index in range(1, replicas):
        extra[f"GRPC_PORT+{index}"] = ports["GRPC_PORT"] + index
        if ports["METRICS_PORT"]:
            extra[f"METRICS_PORT+{index}"] = ports["METRICS_PORT"] + index
    return extra


def _purpose(name: str) -> str:
    base, _, offset = name.partition("+")
    if base == "NATS_ROUTE":
        return f"the route port of NATS node {int(offset) + 1}"
    if base == "NATS_PORT" and offset:
        return f"NATS node {int(offset) + 1}"
    purpose = STACK_PORTS[base][1]
    return f"{purpose} of replica {int(offset) + 1}" if offset else purpose


def _port_problems(ports: dict[str, int]) -> list[str]:
    """Why the stack could not listen where `ports` say, one line a port; empty when it can."""
    problems = []
    first_user: dict[int, str] = {}
    for name, port in ports.items():
        if port == 0:
            continue
        purpose = _purpose(name)
        if port in first_user:
            problems.append(f"{name} and {first_user[port]} are both {port}")
        elif port_is_taken(port):
            holder = port_holder(port)
            by = f"held by {holder}" if holder else "held by a process this user cannot see"
            problems.append(f"port {port} ({name}, {purpose}) is {by}")
        first_user.setdefault(port, name)
    return problems


def _how_to_call(tls: TlsFiles | None, grpc_port: int, http_port: int) -> str:
    """The banner's gRPC and REST lines; with TLS, the files each kind of caller needs."""
    if tls is None:
        return (
            f"  gRPC   127.0.0.1:{grpc_port}"
            f"   (.venv/bin/grpcurl -plaintext 127.0.0.1:{grpc_port} list)\n"
            f"  REST   http://127.0.0.1:{http_port}/v1/products\n"
        )
    ca = _shown(tls.ca_cert)
    return (
        f"  gRPC   127.0.0.1:{grpc_port}, TLS with a client certificate:\n"
        f"         .venv/bin/grpcurl -cacert {ca} -cert {_shown(tls.client_cert)}"
        f" -key {_shown(tls.client_key)} 127.0.0.1:{grpc_port} list\n"
        f"  REST   https://127.0.0.1:{http_port}/v1/products, TLS:\n"
        f"         curl --cacert {ca} https://127.0.0.1:{http_port}/v1/products\n"
    )


def run(
    *,
    tls: bool = False,
    warehouse: bool = True,
    replicas: int = 1,
    nats_nodes: int = 1,
    pg_replica: bool = False,
) -> int:
    # Ctrl-C and `kill` both stop the whole stack, even where SIGINT was inherited ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    ports = {name: _port(name) for name in STACK_PORTS}
    # Checked before anything starts: otherwise Envoy (say) dies after the rest is up, and
    # its "Address already in use" is only in its log.
    extra_ports = _replica_ports(ports, replicas) | _nats_ports(ports, nats_nodes)
    if problems := _port_problems(ports | extra_ports):
        print(
            "make run cannot start, nothing was started:\n  "
            + "\n  ".join(problems)
            + "\nStop what holds a port, or move the stack with its variable, e.g."
            + " `HTTP_PORT=8081 make run`.",
            file=sys.stderr,
        )
        return 1
    if not tls and (inherited := [name for name in SERVER_TLS_SETTINGS if name in os.environ]):
        print(
            f"make run serves plaintext unless TLS=1, which makes its own certificates;"
            f" unset {', '.join(inherited)}",
            file=sys.stderr,
        )
        return 1
    grpc_port, http_port = ports["GRPC_PORT"], ports["HTTP_PORT"]
    admin_port, metrics_port = ports["ENVOY_ADMIN_PORT"], ports["METRICS_PORT"]
    localstripe_port, provider_proxy_port = ports["LOCALSTRIPE_PORT"], ports["PROVIDER_PROXY_PORT"]
    webhook_secret = os.environ.get("STRIPE_WEBHOOK_SECRET", DEV_WEBHOOK_SECRET)
    secret = ensure_jwt_secret()
    DATA_DIR.mkdir(exist_ok=True)
    tls_files = ensure_development_tls(DATA_DIR / "tls") if tls else None
    scheme = "https" if tls_files is not None else "http"
    databases = database_with_replica() if pg_replica else _without_replica(database())
    with databases as (database_url, replica_url), dev_token_endpoint(secret) as dev_token_port:
        print(f"PostgreSQL: {database_url}", flush=True)
        if replica_url is not None:
            print(f"PostgreSQL streaming replica: {replica_url}", flush=True)
        upgrade_schema(database_url)
        seed_demo_catalog(database_url)
        if warehouse:
            seed_demo_warehouse(database_url)
        config_path = DATA_DIR / "envoy.yaml"
        config_path.write_text(
            render_envoy_config(
                http_port=http_port,
                grpc_port=[grpc_port + index for index in range(replicas)],
                admin_port=admin_port,
                provider_proxy_port=provider_proxy_port,
                localstripe_port=localstripe_port,
                tls=tls_files,
                # The storefront's "sign in as a name": this copy of envoy.yaml only.
                dev_token_port=dev_token_port,
            )
        )
        if tls_files is not None:
            # localstripe posts its webhooks to the https listener; it (aiohttp, on OpenSSL's
            # default paths) trusts the development CA. The server inherits it: in make run it
            # calls only localstripe, over plain HTTP.
            os.environ["SSL_CERT_FILE"] = str(tls_files.ca_cert)
        with (DATA_DIR / "localstripe.log").open("ab") as localstripe_log:
            localstripe = start_localstripe(
                localstripe_port, log=localstripe_log, store_path=DATA_DIR / "localstripe.pickle"
            )
        try:
            wait_for_localstripe(localstripe_port, localstripe)
            register_localstripe_webhook(
                localstripe_port, f"{scheme}://127.0.0.1:{http_port}{WEBHOOK_PATH}", webhook_secret
            )
        except BaseException:
            stop_process(localstripe)
            raise
        with (DATA_DIR / "mail.log").open("ab") as mail_log:
            mail_sink = start_mail_sink(ports["SMTP_PORT"], MAIL_DIR, log=mail_log)
        nats_ports = [ports["NATS_PORT"] + index for index in range(nats_nodes)]
        nats_nodes_started = []
        for index, port in enumerate(nats_ports):
            # One node: .data/nats and nats.log as always; a cluster: a folder and log each.
            suffix = f"-{index + 1}" if nats_nodes > 1 else ""
            with (DATA_DIR / f"nats{suffix}.log").open("ab") as nats_log:
                nats_nodes_started.append(
                    start_nats(
                        port,
                        DATA_DIR / f"nats{suffix}",
                        log=nats_log,
                        cluster_ports=nats_ports if nats_nodes > 1 else (),
                    )
                )
        fleet = Fleet(
            {
                "DATABASE_URL": database_url,
                **({"DATABASE_REPLICA_URL": replica_url} if replica_url is not None else {}),
                "SMTP_URL": f"smtp://127.0.0.1:{ports['SMTP_PORT']}",
                # every span as a JSON line (make trace ORDER=<id>)
                "TRACE_FILE": str(DATA_DIR / "traces.jsonl"),
                "NATS_URL": nats_url(*nats_ports),
                "MARKETPLACE_JWT_SECRET": secret,
                # The server reaches localstripe through Envoy, where faults can be injected.
                "STRIPE_API_BASE": f"http://127.0.0.1:{provider_proxy_port}",
                "STRIPE_API_KEY": LOCALSTRIPE_API_KEY,
                "STRIPE_WEBHOOK_SECRET": webhook_secret,
                # The development stack: the server then accepts the published webhook secret.
                "MARKETPLACE_DEVSTACK": "1",
                **(tls_files.server_env() if tls_files is not None else {}),
                # Several replicas: a stopped one waits for Envoy's health check (every
                # second) to take it out of rotation before it closes its port.
                **({"SHUTDOWN_DELAY": "2"} if replicas > 1 else {}),
            },
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            metrics_dir=DATA_DIR / "metrics",
        )
        for _ in range(replicas):
            fleet.start_replica()
        with (DATA_DIR / "envoy.log").open("ab") as envoy_log:
            envoy = start_envoy(config_path, log=envoy_log)
        stand_ins: list[subprocess.Popen[bytes]] = []  # the stand-in warehouse, unless off
        try:
            credentials = tls_files.channel_credentials() if tls_files is not None else None
            for replica in fleet.replicas:
                wait_for_grpc(replica.grpc_port, replica.process, credentials=credentials)
            wait_for_envoy(admin_port, envoy)
            wait_for_mail_sink(ports["SMTP_PORT"], mail_sink)
            for port, node in zip(nats_ports, nats_nodes_started, strict=True):
                wait_for_nats(port, node)
            if warehouse:
                with (DATA_DIR / "warehouse.log").open("ab") as warehouse_log:
                    stand_ins.append(start_warehouse(nats_url(*nats_ports), log=warehouse_log))
            customer = issue_development_token(
                secret,
                "demo-customer",
                ["customer"],
                lifetime_seconds=TOKEN_LIFETIME_SECONDS,
                email=development_email("demo-customer"),
            )
            admin = issue_development_token(
                secret,
                "demo-admin",
                ["admin"],
                lifetime_seconds=TOKEN_LIFETIME_SECONDS,
                email=development_email("demo-admin"),
            )
            metrics = (
                f"http://127.0.0.1:{metrics_port}/metrics   (Prometheus)"
                if metrics_port
                else "off (METRICS_PORT=0)"
            )
            if replicas > 1:
                metrics = f"each replica's, below{'' if metrics_port else ' (off: METRICS_PORT=0)'}"
            print(
                f"\nMarketplace is up.\n"
                f"{_how_to_call(tls_files, grpc_port, http_port)}"
                f"  web    {scheme}://127.0.0.1:{http_port}/ (the storefront; sign in with any"
                f" name)   {scheme}://127.0.0.1:{http_port}/docs (Swagger UI)\n"
                f"  metrics {metrics}\n"
                f"{_replica_lines(fleet, http_port) if replicas > 1 else ''}"
                f"  Envoy admin http://127.0.0.1:{admin_port}"
                f"   envoy log: {_shown(DATA_DIR / 'envoy.log')}\n"
                f"  localstripe http://127.0.0.1:{localstripe_port}"
                f" (the server's Stripe, via Envoy on {provider_proxy_port})"
                f"   log: {_shown(DATA_DIR / 'localstripe.log')}\n"
                f"  a card: make card CARD={SUCCESS_CARD}\n"
                f"  mail   smtp://127.0.0.1:{ports['SMTP_PORT']} keeps every email in"
                f" {_shown(MAIL_DIR)}/   make mail lists them, make mail N=1 prints the latest\n"
                f"  NATS   {nats_url(*nats_ports)}, JetStream in"
                f" {_shown(DATA_DIR / 'nats')}{'-N' if nats_nodes > 1 else ''}/"
                f"{' (a cluster: each stream on all three nodes)' if nats_nodes > 1 else ''}"
                "   make events tails the events\n"
                f"  warehouse {_warehouse_line(warehouse)}\n"
                f"\n  export CUSTOMER_TOKEN={customer}\n"
                f"  export ADMIN_TOKEN={admin}\n"
                f"\nCtrl-C stops everything.\n",
                flush=True,
            )
            running = (envoy, localstripe, mail_sink, *nats_nodes_started, *stand_ins)
            # A replica may be stopped or killed (to see Envoy route around it); the stack
            # stops when the last one has gone.
            while all(p.poll() is None for p in running) and fleet.watch():
                time.sleep(0.5)
            print("a component exited; stopping", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping...", flush=True)
            return 0
        finally:
            for stand_in in stand_ins:
                stop_process(stand_in)
            stop_process(envoy)
            fleet.stop()
            stop_process(localstripe)
            stop_process(mail_sink)
            for node in nats_nodes_started:
                stop_process(node)


@contextlib.contextmanager
def _without_replica(database: ContextManager[str]) -> Iterator[tuple[str, str | None]]:
    with database as url:
        yield url, None


def _replica_lines(fleet: Fleet, http_port: int) -> str:
    """One line a replica: its gRPC port, its /metrics, its pid."""
    lines = []
    for replica in fleet.replicas:
        metrics = (
            f"http://127.0.0.1:{replica.metrics_port}/metrics" if replica.metrics_port else "-"
        )
        lines.append(
            f"  replica {replica.number}  gRPC 127.0.0.1:{replica.grpc_port}   metrics {metrics}"
            f"   pid {replica.process.pid}\n"
        )
    return (
        "".join(lines)
        + f"         behind Envoy, which takes gRPC on 127.0.0.1:{http_port} too and spreads"
        " calls over the healthy ones;\n"
        "         `kill -TERM <pid>` drains one, the rest serve\n"
    )


def _warehouse_line(on: bool) -> str:
    if not on:
        return "off (WAREHOUSE=0); make stock-level still publishes levels"
    return (
        f"the stand-in ships paid orders after {ship_delay_from_environment():g} s"
        f" (WAREHOUSE_SHIP_DELAY), state {_shown(STATE_FILE)}"
        f"   log: {_shown(DATA_DIR / 'warehouse.log')}\n"
        f"         make stock-level SKU=TEE-BLACK-M ON_HAND=40 publishes a level by hand"
    )


def print_token(role: str, subject: str, email: str | None) -> int:
    roles = [r for r in role.replace(",", " ").split() if r]
    known = [str(r) for r in Role]
    unknown = [r for r in roles if r not in known]
    if unknown or not roles:
        what = f"unknown role {', '.join(map(repr, unknown))}" if unknown else "no role given"
        print(
            f"{what}: the roles are {', '.join(known)}"
            f" (both: {','.join(known)}); a token without a known role can do nothing",
            file=sys.stderr,
        )
        return 1
    print(
        issue_development_token(
            ensure_jwt_secret(),
            subject,
            roles,
            lifetime_seconds=TOKEN_LIFETIME_SECONDS,
            email=development_email(subject) if email is None else (email or None),
        )
    )
    return 0


def print_card(number: str) -> int:
    port = _port("LOCALSTRIPE_PORT")
    try:
        print(create_test_payment_method(port, number))
    except CardRefused as refusal:
        print(
            f"localstripe refused the card {number}: {refusal}. It takes 16-digit Stripe test"
            f" numbers: {SUCCESS_CARD} pays, {DECLINED_CARD} is declined when charged",
            file=sys.stderr,
        )
        return 1
    except OSError as error:
        print(
            f"localstripe on port {port} did not answer ({error}); is `make run` up?",
            file=sys.stderr,
        )
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=devstack.__doc__)
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve TLS, mutual on the gRPC port, with a development CA kept in .data/tls/",
    )
    commands = parser.add_subparsers(dest="command")
    token = commands.add_parser("token", help="print a development JWT")
    token.add_argument(
        "--role", default="customer", help="customer, admin, or both: 'customer,admin'"
    )
    token.add_argument("--sub", default="demo-customer", help="the customer id")
    token.add_argument(
        "--email",
        help="the email claim (default: <sub>@example.com; an empty one: no claim, so no"
        " notification emails)",
    )
    card = commands.add_parser(
        "card", help="print a new PaymentMethod id from the running localstripe"
    )
    card.add_argument(
        "--number",
        default=SUCCESS_CARD,
        help=f"a Stripe test card: {SUCCESS_CARD} pays, {DECLINED_CARD} is declined",
    )
    emulator = commands.add_parser("localstripe", help="run localstripe (used by `make run`)")
    emulator.add_argument("--port", type=int, default=8420)
    emulator.add_argument("--store", type=Path, help="keep the store in this file across runs")
    parser.add_argument(
        "--no-warehouse", action="store_true", help="without the stand-in warehouse"
    )
    parser.add_argument(
        "--pg-replica",
        action="store_true",
        help="a streaming replica of the embedded PostgreSQL, as DATABASE_REPLICA_URL"
        " (make run PG_REPLICA=1)",
    )
    parser.add_argument(
        "--nats-cluster",
        type=int,
        default=1,
        help="NATS nodes: 3 makes a JetStream cluster on NATS_PORT, +1, +2 with every stream"
        " on all three (make run NATS_CLUSTER=3)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="server replicas behind Envoy, on GRPC_PORT, GRPC_PORT+1, ... (make run REPLICAS=N)",
    )
    options = parser.parse_args()
    if options.command == "token":
        return print_token(options.role, options.sub, options.email)
    if options.command == "card":
        return print_card(options.number)
    if options.command == "localstripe":
        # The storefront makes its PaymentMethods in the browser, through this Stripe.js.
        teach_payment_methods()
        serve_localstripe(options.port, options.store)
        return 0
    if options.replicas < 1:
        parser.error("--replicas must be at least 1")
    if options.nats_cluster < 1:
        parser.error("--nats-cluster must be at least 1")
    return run(
        tls=options.tls,
        warehouse=not options.no_warehouse,
        replicas=options.replicas,
        nats_nodes=options.nats_cluster,
        pg_replica=options.pg_replica,
    )


if __name__ == "__main__":
    raise SystemExit(main())
