"""All configuration, read once from the environment into one typed object."""

from __future__ import annotations

import ssl
from email.utils import parseaddr
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, FilePath, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.notifications.smtp import parse_smtp_url

# make run's webhook secret (devstack/localstripe.py), in the repository for anyone to read.
DEVELOPMENT_WEBHOOK_SECRET = "whsec_marketplace_development"  # noqa: S105


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    # An error names the setting, never echoes the environment: SMTP_URL carries a password.
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", hide_input_in_errors=True
    )

    database_url: str = Field(validation_alias=_env("DATABASE_URL"))
    # A streaming replica of DATABASE_URL's database for catalog reads (ListProducts, GetProduct
    # misses); unset, every read goes to the primary.
    database_replica_url: str | None = Field(None, validation_alias=_env("DATABASE_REPLICA_URL"))
    grpc_host: str = Field("127.0.0.1", validation_alias=_env("GRPC_HOST"))
    grpc_port: int = Field(50051, validation_alias=_env("GRPC_PORT"))
    # Server processes sharing the port; 0 means one per core.
    server_workers: int = Field(0, ge=0, validation_alias=_env("SERVER_WORKERS"))
    # 0 turns the Prometheus endpoint off.
    metrics_port: int = Field(9464, validation_alias=_env("METRICS_PORT"))
    # TLS on the gRPC port: a PEM certificate chain and its key; with a client CA as well,
    # callers must present a certificate it signed (mutual TLS). Without them, plaintext.
    tls_cert_file: FilePath | None = Field(None, validation_alias=_env("TLS_CERT_FILE"))
    tls_key_file: FilePath | None = Field(None, validation_alias=_env("TLS_KEY_FILE"))
    tls_client_ca_file: FilePath | None = Field(None, validation_alias=_env("TLS_CLIENT_CA_FILE"))

    db_pool_size: int = Field(10, ge=1, validation_alias=_env("DB_POOL_SIZE"))
    db_max_overflow: int = Field(10, ge=0, validation_alias=_env("DB_MAX_OVERFLOW"))
    db_pool_timeout_seconds: float = Field(5.0, gt=0, validation_alias=_env("DB_POOL_TIMEOUT"))
    db_connect_timeout_seconds: int = Field(3, ge=1, validation_alias=_env("DB_CONNECT_TIMEOUT"))
    db_statement_timeout_ms: int = Field(
        10_000, ge=100, validation_alias=_env("DB_STATEMENT_TIMEOUT_MS")
    )
    health_check_interval_seconds: float = Field(
        1.0, gt=0, validation_alias=_env("HEALTH_CHECK_INTERVAL")
    )

    # HS256 shared secret (development), or a public key / JWKS file (production).
    jwt_secret: str | None = Field(None, validation_alias=_env("MARKETPLACE_JWT_SECRET"))
    jwt_public_key_file: Path | None = Field(
        None, validation_alias=_env("MARKETPLACE_JWT_PUBLIC_KEY_FILE")
    )
    jwt_jwks_file: Path | None = Field(None, validation_alias=_env("MARKETPLACE_JWT_JWKS_FILE"))
    jwt_issuer: str | None = Field(None, validation_alias=_env("MARKETPLACE_JWT_ISSUER"))
    jwt_audience: str | None = Field(None, validation_alias=_env("MARKETPLACE_JWT_AUDIENCE"))
    jwt_leeway_seconds: int = Field(30, ge=0, validation_alias=_env("MARKETPLACE_JWT_LEEWAY"))

    # Group commit for CreateOrder: at most this many orders per transaction, and this many
    # transactions in flight per process. One runner measured best (make bench): while it
    # commits, the next batch fills, and fewer, larger batches cost far less per order.
    order_batch_max: int = Field(128, ge=1, validation_alias=_env("ORDER_BATCH_MAX"))
    order_batch_runners: int = Field(1, ge=1, validation_alias=_env("ORDER_BATCH_RUNNERS"))
    # Products each process keeps in memory for GetProduct (server/services/product_cache.py;
    # about 600 bytes each plus their text); 0 reads every GetProduct from the database.
    product_cache_size: int = Field(20_000, ge=0, validation_alias=_env("PRODUCT_CACHE_SIZE"))

    # The payment provider (Stripe's API; localstripe in development and tests). The base
    # URL is where the SDK sends requests: Stripe itself, or the fault-injecting Envoy
    # listener in front of localstripe.
    stripe_api_key: str = Field("sk_test_marketplace", validation_alias=_env("STRIPE_API_KEY"))
    stripe_api_base: str = Field("https://api.stripe.com", validation_alias=_env("STRIPE_API_BASE"))
    # The webhook endpoint's signing secret: required, and never the development stack's
    # published one outside it (anyone could sign webhooks with that).
    stripe_webhook_secret: str = Field(
        min_length=16, validation_alias=_env("STRIPE_WEBHOOK_SECRET")
    )
    # Set by `make run` only (devstack/), never a default: marks the development stack.
    development_stack: bool = Field(False, validation_alias=_env("MARKETPLACE_DEVSTACK"))
    # Each provider call: this timeout per attempt, at most this many attempts.
    provider_timeout_seconds: float = Field(5.0, gt=0, validation_alias=_env("PROVIDER_TIMEOUT"))
    provider_max_attempts: int = Field(3, ge=1, validation_alias=_env("PROVIDER_MAX_ATTEMPTS"))
    # The circuit opens after this many failed calls in a row and lets a probe through
    # after this many seconds.
    provider_breaker_threshold: int = Field(
        5, ge=1, validation_alias=_env("PROVIDER_BREAKER_THRESHOLD")
    )
    provider_breaker_reset_seconds: float = Field(
        30.0, gt=0, validation_alias=_env("PROVIDER_BREAKER_RESET")
    )
    # An order not paid within this time expires and its stock is released.
    order_payment_timeout_seconds: float = Field(
        900.0, gt=0, validation_alias=_env("ORDER_PAYMENT_TIMEOUT")
    )
    # Background work in every process: expiry of unpaid orders, reconciliation of payments
    # and refunds whose outcome is unknown (a pending one is looked at once it is this old).
    background_interval_seconds: float = Field(
        5.0, gt=0, validation_alias=_env("BACKGROUND_INTERVAL")
    )
    reconcile_after_seconds: float = Field(30.0, ge=0, validation_alias=_env("RECONCILE_AFTER"))
    background_batch_size: int = Field(100, ge=1, validation_alias=_env("BACKGROUND_BATCH"))

    # Events (server/events/, docs/operations.md). NATS is reached in the background: down
    # at start or later, the server serves and events wait in the outbox.
    nats_url: str = Field("nats://127.0.0.1:4222", validation_alias=_env("NATS_URL"))
    # The outbox relay: rows per poll, the wait between polls while busy and the longest
    # when idle, how often a process that is not the relay's leader tries to become it,
    # and how long published rows (and consumers' inbox rows) are kept.
    # Each round pays a read, a mark and its acks' wait once: larger rounds cost the order
    # path less (a 0.25 s busy poll against 0.05 s: docs/benchmarks.md), at the price of
    # events leaving up to that much later.
    outbox_batch: int = Field(500, ge=1, le=10_000, validation_alias=_env("OUTBOX_BATCH"))
    outbox_busy_poll_seconds: float = Field(
        0.25, gt=0, le=5, validation_alias=_env("OUTBOX_BUSY_POLL")
    )
    outbox_idle_poll_seconds: float = Field(0.5, gt=0, validation_alias=_env("OUTBOX_IDLE_POLL"))
    outbox_leader_retry_seconds: float = Field(
        2.0, gt=0, validation_alias=_env("OUTBOX_LEADER_RETRY")
    )
    outbox_retention_seconds: float = Field(
        7 * 24 * 3600.0, ge=0, validation_alias=_env("OUTBOX_RETENTION")
    )
    outbox_prune_interval_seconds: float = Field(
        60.0, gt=0, validation_alias=_env("OUTBOX_PRUNE_INTERVAL")
    )
    # Where the relay runs when a supervisor runs several workers (SERVER_WORKERS > 1; one
    # process always runs its own): "process", one process of its own at CPU priority
    # OUTBOX_RELAY_NICE, so a saturated machine places orders first and events wait in the
    # outbox until there is CPU to spare; "worker", in every worker, one leading. 19: the
    # relay publishes with the CPU the order path leaves (docs/benchmarks.md), and a machine
    # saturated for minutes shows as outbox lag, with its alert.
    outbox_relay: Literal["process", "worker"] = Field(
        "process", validation_alias=_env("OUTBOX_RELAY")
    )
    outbox_relay_nice: int = Field(19, ge=0, le=19, validation_alias=_env("OUTBOX_RELAY_NICE"))
    # Bench only (`make bench` measures the order transaction with and without events in
    # one run): false writes no outbox rows, so no events are ever published. Never in
    # production.
    outbox_writes: bool = Field(True, validation_alias=_env("OUTBOX_WRITES"))
    inbox_retention_seconds: float = Field(
        30 * 24 * 3600.0, ge=0, validation_alias=_env("INBOX_RETENTION")
    )
    # Consumers: the attempt whose failure dead-letters a message, how long a delivery may
    # go unacknowledged, and the first retry's delay (doubling per attempt, at most 60 s).
    consumer_max_deliver: int = Field(5, ge=1, validation_alias=_env("CONSUMER_MAX_DELIVER"))
    consumer_ack_wait_seconds: float = Field(30.0, gt=0, validation_alias=_env("CONSUMER_ACK_WAIT"))
    consumer_retry_delay_seconds: float = Field(
        1.0, gt=0, validation_alias=_env("CONSUMER_RETRY_DELAY")
    )

    event_loop: Literal["uvloop", "asyncio"] = Field("uvloop", validation_alias=_env("EVENT_LOOP"))

    shutdown_grace_seconds: float = Field(10.0, ge=0, validation_alias=_env("SHUTDOWN_GRACE"))
    # Between reporting NOT_SERVING and closing the port on SIGTERM: long enough for the
    # gateway's health checks to take the replica out of rotation.
    shutdown_delay_seconds: float = Field(0.0, ge=0, validation_alias=_env("SHUTDOWN_DELAY"))
    max_concurrent_rpcs: int = Field(1000, ge=1, validation_alias=_env("MAX_CONCURRENT_RPCS"))
    # Long-lived streams (health Watch, reflection) each process serves at once, in all and
    # per peer address, apart from the calls above: streams nobody closes must not take
    # their places (docs/operations.md).
    max_concurrent_streams: int = Field(100, ge=0, validation_alias=_env("MAX_CONCURRENT_STREAMS"))
    max_streams_per_peer: int = Field(10, ge=0, validation_alias=_env("MAX_STREAMS_PER_PEER"))
    # Sizes each server process accepts and sends (docs/operations.md). Requests are small (a
    # product, an order of 100 lines, a provider webhook); a page of 1,000 products with
    # 5,000-character descriptions comes to about 21 MiB, so answers may be larger. Envoy's
    # header cap (REST_MAX_HEADERS_KB) stays well inside the metadata one.
    grpc_max_receive_bytes: int = Field(
        4 * 1024 * 1024, ge=64 * 1024, validation_alias=_env("GRPC_MAX_RECEIVE_BYTES")
    )
    grpc_max_send_bytes: int = Field(
        32 * 1024 * 1024, ge=64 * 1024, validation_alias=_env("GRPC_MAX_SEND_BYTES")
    )
    grpc_max_metadata_bytes: int = Field(
        64 * 1024, ge=8 * 1024, validation_alias=_env("GRPC_MAX_METADATA_BYTES")
    )
    # Email to customers (server/notifications/): the SMTP server as smtp://host:port,
    # smtp+starttls://user:pass@host:587 or smtps://user:pass@host:465. Unset, none is sent.
    smtp_url: str | None = Field(None, validation_alias=_env("SMTP_URL"))
    mail_from: str = Field(
        "Marketplace <orders@marketplace.example.com>", validation_alias=_env("MAIL_FROM")
    )
    # One message's whole SMTP conversation; the consumer's inbox transaction stays open
    # while it lasts.
    mail_send_timeout_seconds: float = Field(10.0, gt=0, validation_alias=_env("MAIL_SEND_TIMEOUT"))
    # Older events send no email: switching SMTP_URL on later must not mail every past order
    # still on the stream, and news a day late is no longer news.
    mail_max_event_age_seconds: float = Field(
        86400.0, gt=0, validation_alias=_env("MAIL_MAX_EVENT_AGE")
    )
    # Tracing (OpenTelemetry): spans go over OTLP to this endpoint when it is set, else to
    # TRACE_FILE as JSON lines when that is set (make run), else nowhere (no tracing cost).
    otel_exporter_otlp_endpoint: str | None = Field(
        None, validation_alias=_env("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    trace_file: Path | None = Field(None, validation_alias=_env("TRACE_FILE"))
    otel_service_name: str = Field("marketplace", validation_alias=_env("OTEL_SERVICE_NAME"))
    log_level: str = Field("INFO", validation_alias=_env("LOG_LEVEL"))
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", validation_alias=_env("LOG_FORMAT")
    )

    @model_validator(mode="after")
    def _one_key_source(self) -> Settings:
        sources = [self.jwt_secret, self.jwt_public_key_file, self.jwt_jwks_file]
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                "set exactly one of MARKETPLACE_JWT_SECRET, MARKETPLACE_JWT_PUBLIC_KEY_FILE,"
                " MARKETPLACE_JWT_JWKS_FILE"
            )
        return self

    @model_validator(mode="after")
    def _no_development_webhook_secret(self) -> Settings:
        if self.stripe_webhook_secret == DEVELOPMENT_WEBHOOK_SECRET and not self.development_stack:
            raise ValueError(
                "STRIPE_WEBHOOK_SECRET is the development stack's published secret, with which"
                " anyone can sign webhooks: set the signing secret of your webhook endpoint"
                " (MARKETPLACE_DEVSTACK=1 is for make run only)"
            )
        return self

    @field_validator("smtp_url", mode="before")
    @classmethod
    def _empty_smtp_url_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _smtp_url_parses(self) -> Settings:
        """A bad SMTP_URL or MAIL_FROM stops the server at start, not each email later."""
        if self.smtp_url is None:
            return self
        parse_smtp_url(self.smtp_url)
        if "@" not in parseaddr(self.mail_from)[1]:
            raise ValueError(
                "MAIL_FROM must be an address, e.g. Shop <orders@shop.example>,"
                f" not {self.mail_from!r}"
            )
        return self

    @model_validator(mode="after")
    def _tls_files_load(self) -> Settings:
        """Checked here, so a bad file stops the supervisor before any worker starts: grpc
        itself only reports "Failed to bind to address"."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set TLS_CERT_FILE and TLS_KEY_FILE together, or neither")
        if self.tls_cert_file is None:
            if self.tls_client_ca_file is not None:
                raise ValueError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
            return self
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # An encrypted key fails here instead of prompting: grpc takes no passphrase.
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file, password=b"")
        except ssl.SSLError as error:
            raise ValueError(
                "TLS_CERT_FILE and TLS_KEY_FILE must be a PEM certificate chain and its"
                f" unencrypted PEM key: {error}"
            ) from error
        if self.tls_client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.tls_client_ca_file)
            except ssl.SSLError as error:
                raise ValueError(
                    f"TLS_CLIENT_CA_FILE must hold PEM CA certificates: {error}"
                ) from error
        return self
