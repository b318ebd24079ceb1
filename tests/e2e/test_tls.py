"""TLS on the gRPC port and on Envoy's REST listener (TLS_CERT_FILE, TLS_KEY_FILE), mutual
TLS on the gRPC port (TLS_CLIENT_CA_FILE), and Envoy reaching the server over TLS. Every CA
here is a throwaway one, made with `cryptography` by devstack/tls.py."""

from __future__ import annotations

import contextlib
import re
import shlex
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pydantic
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack import REPO_ROOT
from devstack.__main__ import STACK_PORTS
from devstack.envoy import envoy_in_front_of
from devstack.localstripe import SUCCESS_CARD, create_test_payment_method
from devstack.postgres import DEMO_PRODUCTS, create_database, drop_database
from devstack.processes import free_port, stop_process
from devstack.server import start_server, wait_for_grpc
from devstack.tls import TlsFiles, ensure_development_tls, make_development_tls
from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from marketplace_client import MarketplaceClient
from server.settings import Settings
from tests.conftest import JWT_SECRET, Tokens, insert_product, table_snapshot
from tests.e2e.test_devstack import Run, _environment
from tests.stack import WEBHOOK_SECRET, Stack, bearer, running_stack, server_env

pytestmark = pytest.mark.e2e

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
SERVICES = {
    "marketplace.catalog.v1.CatalogService",
    "marketplace.order.v1.OrderService",
    "marketplace.payment.v1.PaymentService",
    "grpc.health.v1.Health",
}
_MUG = DEMO_PRODUCTS[0][0]
_DELIVERED = 'webhook "payment_intent.succeeded" successfully delivered'


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_development_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Another CA and the certificates it signed: nothing of it is trusted by the stack."""
    return make_development_tls(tmp_path_factory.mktemp("stranger"))


@pytest.fixture(scope="module")
def tls_database_url(postgres_server_url: str) -> Iterator[str]:
    url = create_database(postgres_server_url, "marketplace_tls")
    yield url
    drop_database(postgres_server_url, url)


@pytest.fixture(scope="module")
def tls_stack(tls_database_url: str, tls: TlsFiles) -> Iterator[Stack]:
    """The server requiring client certificates, Envoy's listener serving TLS."""
    with running_stack(tls_database_url, tls=tls) as stack:
        yield stack


def _ca_trust(files: TlsFiles) -> ssl.SSLContext:
    return _ca_trust_file(files.ca_cert)


def _ca_trust_file(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


async def test_the_python_client_with_a_client_certificate_is_served(
    tls_stack: Stack, tls: TlsFiles, tokens: Tokens
) -> None:
    async with MarketplaceClient(
        tls_stack.grpc_target, token=tokens.admin(), credentials=tls.channel_credentials()
    ) as client:
        created = await client.create_product(
            sku=f"TLS-{uuid.uuid4().hex[:8]}", name="Over TLS", price="5.00", currency="USD"
        )
        assert (await client.get_product(created.id)).sku == created.sku


def _stranger_certificate(tls: TlsFiles, stranger: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_cert.read_bytes(),
        private_key=stranger.client_key.read_bytes(),
        certificate_chain=stranger.client_cert.read_bytes(),
    )


# Each: a caller's credentials from (the stack's files, a stranger's); None is plaintext.
REFUSED_CALLERS: dict[str, Callable[[TlsFiles, TlsFiles], grpc.ChannelCredentials | None]] = {
    "plaintext": lambda tls, stranger: None,
    "no client certificate": lambda tls, stranger: tls.channel_credentials(
        client_certificate=False
    ),
    "a client certificate another CA signed": _stranger_certificate,
    # The caller's side: the server's certificate does not chain to what the caller trusts.
    "a caller trusting another CA": lambda tls, stranger: stranger.channel_credentials(),
}


@pytest.mark.parametrize("caller", list(REFUSED_CALLERS))
async def test_grpc_callers_without_a_trusted_client_certificate_are_refused(
    caller: str,
    tls_stack: Stack,
    tls_database_url: str,
    tls: TlsFiles,
    stranger: TlsFiles,
    tokens: Tokens,
) -> None:
    before = table_snapshot(tls_database_url)
    credentials = REFUSED_CALLERS[caller](tls, stranger)
    async with (
        grpc.aio.insecure_channel(tls_stack.grpc_target)
        if credentials is None
        else grpc.aio.secure_channel(tls_stack.grpc_target, credentials)
    ) as channel:
        product = catalog_pb2.Product(
            sku=f"NOPE-{uuid.uuid4().hex[:8]}", name="Refused", price={"currency_code": "USD"}
        )
        product.price.units = 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await catalog_pb2_grpc.CatalogServiceStub(channel).CreateProduct(
                catalog_pb2.CreateProductRequest(product=product),
                metadata=bearer(tokens.admin()),
                timeout=5,
            )
    # The handshake fails before any call exists: the transport's code, no details.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert table_snapshot(tls_database_url) == before


async def test_rest_over_https_reaches_the_server_through_envoys_client_certificate(
    tls_stack: Stack, tls_database_url: str, tls: TlsFiles, tokens: Tokens
) -> None:
    product_id = insert_product(tls_database_url, stock=5)
    async with httpx.AsyncClient(
        base_url=tls_stack.rest_base, verify=_ca_trust(tls), timeout=30
    ) as rest:
        assert (await rest.get(f"/v1/products/{product_id}")).status_code == 200
        created = await rest.post(
            "/v1/orders",
            headers={"authorization": f"Bearer {tokens.customer()}"},
            json={
                "requestId": str(uuid.uuid4()),
                "items": [{"productId": product_id, "quantity": 2}],
            },
        )
    assert created.status_code == 200, created.text
    assert created.json()["order"]["status"] == "ORDER_STATUS_PENDING_PAYMENT"


async def test_the_rest_listener_speaks_only_tls(tls_stack: Stack, tls: TlsFiles) -> None:
    plain = tls_stack.rest_base.replace("https://", "http://")
    async with httpx.AsyncClient(timeout=10) as rest:
        with pytest.raises(httpx.TransportError):
            await rest.get(f"{plain}/v1/products")
        # A caller that does not trust the development CA refuses the listener's certificate.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await rest.get(f"{tls_stack.rest_base}/v1/products")


async def test_grpc_through_envoys_tls_listener_needs_no_client_certificate(
    tls_stack: Stack, tls: TlsFiles
) -> None:
    """Envoy's listener is for browsers and apps: TLS, HTTP/2 by ALPN, no client certificate;
    it is Envoy that presents one to the server."""
    target = f"127.0.0.1:{tls_stack.http_port}"
    credentials = tls.channel_credentials(client_certificate=False)
    async with grpc.aio.secure_channel(target, credentials) as channel:
        listed = await catalog_pb2_grpc.CatalogServiceStub(channel).ListProducts(
            catalog_pb2.ListProductsRequest(page_size=1), timeout=10
        )
    assert len(listed.products) <= 1


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_with_the_client_certificate_lists_and_checks_health(
    tls_stack: Stack, tls: TlsFiles
) -> None:
    listed = _grpcurl(*tls.grpcurl_flags(), tls_stack.grpc_target, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= SERVICES
    checked = _grpcurl(*tls.grpcurl_flags(), tls_stack.grpc_target, "grpc.health.v1.Health/Check")
    assert checked.returncode == 0, checked.stderr
    assert '"status": "SERVING"' in checked.stdout
    without_certificate = _grpcurl("-cacert", str(tls.ca_cert), tls_stack.grpc_target, "list")
    assert without_certificate.returncode != 0


@contextlib.contextmanager
def _server_alone(database_url: str, env: dict[str, str], tls: TlsFiles) -> Iterator[int]:
    """A server process with these TLS settings, ready; its port."""
    port = free_port()
    server = start_server(server_env(database_url, port) | env)
    try:
        wait_for_grpc(port, server, credentials=tls.channel_credentials())
        yield port
    finally:
        assert stop_process(server) == 0


async def test_tls_without_a_client_ca_serves_callers_without_certificates(
    tls_database_url: str, tls: TlsFiles
) -> None:
    env = tls.server_env(require_client_certificates=False)
    with _server_alone(tls_database_url, env, tls) as port:
        credentials = tls.channel_credentials(client_certificate=False)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_envoy_refuses_a_server_whose_certificate_its_ca_did_not_sign(
    tls_database_url: str, tls: TlsFiles, stranger: TlsFiles, tmp_path: Path
) -> None:
    """Envoy checks the server as a gRPC client would: a server with a certificate from
    another CA (a stranger on the server's address) gets no requests."""
    env = tls.server_env(require_client_certificates=False)
    with (
        _server_alone(tls_database_url, env, tls) as grpc_port,
        envoy_in_front_of(grpc_port, tmp_path, tls=stranger) as envoy,
    ):
        async with httpx.AsyncClient(verify=_ca_trust(stranger), timeout=10) as rest:
            answer = await rest.get(f"https://127.0.0.1:{envoy.http_port}/v1/products")
            stats = await rest.get(
                f"http://127.0.0.1:{envoy.admin_port}/stats",
                params={"filter": "^cluster.marketplace_grpc.ssl.fail_verify_error$"},
            )
    assert answer.status_code == 503
    failures = int(stats.text.partition(": ")[2] or 0)
    assert failures >= 1, stats.text


def _settings(**tls_files: Path) -> Settings:
    env = {
        "DATABASE_URL": "postgresql://unused/db",
        "MARKETPLACE_JWT_SECRET": JWT_SECRET,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    env |= {name.upper(): str(path) for name, path in tls_files.items()}
    return Settings(**env)  # type: ignore[arg-type]  # by the environment variables' names


def test_settings_take_a_certificate_its_key_and_a_client_ca(tls: TlsFiles) -> None:
    settings = _settings(
        tls_cert_file=tls.server_cert, tls_key_file=tls.server_key, tls_client_ca_file=tls.ca_cert
    )
    assert settings.tls_client_ca_file == tls.ca_cert


def _not_pem(directory: Path) -> Path:
    path = directory / "not.pem"
    path.write_text("not a certificate\n")
    return path


# Each: the TLS settings given, and words the refusal must contain.
REFUSED_SETTINGS: dict[str, tuple[Callable[[TlsFiles, TlsFiles, Path], dict[str, Path]], str]] = {
    "a key without a certificate": (
        lambda tls, stranger, tmp: {"tls_key_file": tls.server_key},
        "TLS_CERT_FILE and TLS_KEY_FILE",
    ),
    "a certificate without its key": (
        lambda tls, stranger, tmp: {"tls_cert_file": tls.server_cert},
        "TLS_CERT_FILE and TLS_KEY_FILE",
    ),
    "a client CA without a certificate": (
        lambda tls, stranger, tmp: {"tls_client_ca_file": tls.ca_cert},
        "TLS_CLIENT_CA_FILE",
    ),
    "another certificate's key": (
        lambda tls, stranger, tmp: {
            "tls_cert_file": tls.server_cert,
            "tls_key_file": stranger.server_key,
        },
        "TLS_KEY_FILE",
    ),
    "a certificate that is not PEM": (
        lambda tls, stranger, tmp: {"tls_cert_file": _not_pem(tmp), "tls_key_file": tls.server_key},
        "TLS_CERT_FILE",
    ),
    "a client CA that is not PEM": (
        lambda tls, stranger, tmp: {
            "tls_cert_file": tls.server_cert,
            "tls_key_file": tls.server_key,
            "tls_client_ca_file": _not_pem(tmp),
        },
        "TLS_CLIENT_CA_FILE",
    ),
    "a file that is not there": (
        lambda tls, stranger, tmp: {
            "tls_cert_file": tmp / "missing.pem",
            "tls_key_file": tls.server_key,
        },
        "TLS_CERT_FILE",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_SETTINGS))
def test_settings_refuse_tls_files_that_cannot_serve(
    case: str, tls: TlsFiles, stranger: TlsFiles, tmp_path: Path
) -> None:
    """Refused when the settings are read, so the supervisor stops before starting a worker
    (grpc itself only says "Failed to bind to address")."""
    files, named = REFUSED_SETTINGS[case]
    with pytest.raises(pydantic.ValidationError, match=named):
        _settings(**files(tls, stranger, tmp_path))


def test_make_run_tls_makes_a_ca_and_prints_calls_that_work(tmp_path: Path) -> None:
    """`make run TLS=1`: certificates under its data folder, the banner's grpcurl and curl
    calls answer, and localstripe's webhooks reach the server through the TLS listener."""
    data_dir = tmp_path / "data"
    ports = {name: str(free_port()) for name in STACK_PORTS}
    with (tmp_path / "run.log").open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "devstack", "--tls"],
            cwd=REPO_ROOT,
            env=_environment(data_dir, SERVER_WORKERS="1", **ports),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = Run(process, tmp_path / "run.log")
    try:
        run.wait_until_up()
        [grpcurl] = re.findall(r"^ +(\.venv/bin/grpcurl -cacert .+ list)$", run.printed, re.M)
        [(ca, rest)] = re.findall(r"^ +curl --cacert (\S+) (https://\S+)$", run.printed, re.M)
        listed = subprocess.run(
            shlex.split(grpcurl), cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
        )
        assert listed.returncode == 0, listed.stderr
        assert set(listed.stdout.split()) >= SERVICES
        assert (REPO_ROOT / ca).resolve() == data_dir / "tls" / "ca.pem"
        with httpx.Client(verify=_ca_trust_file(REPO_ROOT / ca), timeout=30) as http:
            assert http.get(rest).status_code == 200
            customer = {"authorization": f"Bearer {run.token('customer')}"}
            base = rest.removesuffix("/v1/products")
            placed = http.post(
                f"{base}/v1/orders",
                headers=customer,
                json={
                    "requestId": str(uuid.uuid4()),
                    "items": [{"productId": _MUG, "quantity": 1}],
                },
            )
            assert placed.status_code == 200, placed.text
            card = create_test_payment_method(int(ports["LOCALSTRIPE_PORT"]), SUCCESS_CARD)
            paid = http.post(
                f"{base}/v1/orders/{placed.json()['order']['id']}/payments",
                headers=customer,
                json={"requestId": str(uuid.uuid4()), "paymentMethod": card},
            )
            assert paid.json()["payment"]["status"] == "PAYMENT_STATUS_SUCCEEDED", paid.text

        # localstripe posts it a second after the charge, and logs how it went.
        log = data_dir / "localstripe.log"
        deadline = time.monotonic() + 15
        while _DELIVERED not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        assert run.interrupt() == 0, run.printed


def test_make_run_without_tls_refuses_tls_settings_from_the_shell(
    tmp_path: Path, tls: TlsFiles
) -> None:
    """Otherwise the server would serve TLS to a stack that waits for it in plaintext."""
    ports = {name: str(free_port()) for name in STACK_PORTS}
    env = _environment(tmp_path / "data", TLS_CERT_FILE=str(tls.server_cert), **ports)
    run = subprocess.run(
        [sys.executable, "-m", "devstack"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "serves plaintext unless TLS=1" in run.stderr
    assert "unset TLS_CERT_FILE" in run.stderr
    assert not (tmp_path / "data").exists(), "something was started"


def test_make_run_keeps_its_certificates_until_one_is_missing(tmp_path: Path) -> None:
    first = ensure_development_tls(tmp_path)
    ca = first.ca_cert.read_bytes()
    assert ensure_development_tls(tmp_path).ca_cert.read_bytes() == ca
    assert first.server_key.stat().st_mode & 0o777 == 0o600
    first.client_key.unlink()
    # The CA's key is not kept, so a missing file means a new CA and certificates.
    assert ensure_development_tls(tmp_path).ca_cert.read_bytes() != ca
