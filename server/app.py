"""Composition root: builds every collaborator from Settings and runs the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import Tracer
from prometheus_client import start_http_server
from sqlalchemy.ext.asyncio import AsyncEngine

from marketplace.catalog.v1 import catalog_pb2_grpc
from marketplace.events.v1 import dead_letter_service_pb2_grpc
from marketplace.order.v1 import order_pb2_grpc
from marketplace.payment.v1 import payment_pb2_grpc
from server.adapters.stripe_provider import StripeProvider
from server.adapters.stripe_webhooks import StripeWebhooks
from server.api.auth import TokenVerifier
from server.api.catalog import CatalogServicer
from server.api.dead_letters import DeadLetterServicer
from server.api.health import DatabaseHealth
from server.api.interceptor import InFlightBudget, RequestContextInterceptor
from server.api.orders import OrderServicer
from server.api.payments import PaymentServicer
from server.api.policy import (
    ACCESS_POLICIES,
    CATALOG_SERVICE,
    DEAD_LETTER_SERVICE,
    HEALTH_SERVICE,
    ORDER_SERVICE,
    PAYMENT_SERVICE,
)
from server.db.driver import DriverPool
from server.db.engine import create_engine
from server.domain.catalog import Product
from server.domain.errors import DomainError, ErrorReason
from server.domain.identity import Customer
from server.domain.orders import Order, OrderRequest
from server.events.consumers import ConsumerMetrics, Consumers, ConsumerSettings, Inbox
from server.events.dead_letters import DeadLetterMetrics, DeadLetters, count_dead_letters
from server.events.nats import NatsConnection
from server.events.registry import ConsumerContext, consumer_specs
from server.events.relay import OutboxMetrics
from server.observability import Metrics, configure_logging
from server.relay_process import dedicated_connection_of, relay_from_settings
from server.services.batching import GroupCommitter
from server.services.catalog import Catalog
from server.services.circuit import GuardedProvider
from server.services.product_cache import ProductCache, follow_product_changes, served_from
from server.services.upkeep import stop_task
from server.services.use_cases import UseCases, wire_use_cases
from server.settings import Settings
from server.tracing import GroupCommitTracing, install_tracing, log_processors, tracer_of

_log = structlog.get_logger("marketplace.server")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def serve(settings: Settings, *, reuse_port: bool = False, with_relay: bool = True) -> None:
    """Runs one server process until SIGTERM or SIGINT; `reuse_port` when it is one of
    several sharing the port; `with_relay` unless the outbox relay and the dead-letter count
    run in a process of their own (server/relay_process.py). What it opened is closed again
    however it ends: a signal, a failure while starting, or cancellation."""
    # Before anything connects: the psycopg and httpx instrumentations wrap what is made later.
    tracing = install_tracing(settings)
    configure_logging(settings.log_level, settings.log_format, log_processors(tracing))
    metrics = Metrics.create()
    # With several workers the supervisor serves /metrics for all of them.
    if settings.metrics_port and not reuse_port:
        start_http_server(settings.metrics_port, addr=settings.grpc_host, registry=metrics.registry)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    try:
        async with contextlib.AsyncExitStack() as running:
            if tracing is not None:
                # Last out: exports the spans of the drain too.
                running.callback(tracing.shutdown)
            port = await _start(
                running,
                settings,
                metrics,
                tracer_of(tracing),
                reuse_port=reuse_port,
                with_relay=with_relay,
            )
            _freeze_long_lived_objects()
            _log.info("listening", address=f"{settings.grpc_host}:{port}", tls=_tls_mode(settings))
            for sig in _STOP_SIGNALS:
                loop.add_signal_handler(sig, stopping.set)
            await stopping.wait()
            _log.info("draining", grace_seconds=settings.shutdown_grace_seconds)
    finally:
        # Only once drained: a second signal meanwhile is ignored, not fatal.
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    _log.info("stopped")


async def _start(
    running: contextlib.AsyncExitStack,
    settings: Settings,
    metrics: Metrics,
    tracer: Tracer | None,
    *,
    reuse_port: bool,
    with_relay: bool,
) -> int:
    """Builds everything and starts serving; returns the port. Each part's stop goes on
    `running` as the part is made or started, so unwinding it drains in the reverse order:
    the background tasks, health NOT_SERVING, the calls in flight (within the grace period,
    while the group-commit runners still commit theirs), the runners, then the provider's
    client and the pools."""
    engine = _engine(settings)
    running.push_async_callback(engine.dispose)
    hot_path = _hot_path_pool(settings)
    running.push_async_callback(hot_path.close)
    stripe_provider = _stripe_provider(settings, tracer)
    running.push_async_callback(stripe_provider.aclose)

    health_servicer = health.aio.HealthServicer()
    database_health = DatabaseHealth(
        health_servicer,
        engine,
        (CATALOG_SERVICE, ORDER_SERVICE, PAYMENT_SERVICE),
        settings.health_check_interval_seconds,
        # The hot path's connections died with the database; no call found them lost.
        before_serving_again=hot_path.check_connections,
        on_probe=lambda answered: metrics.database_up.set(1 if answered else 0),
    )
    server = _grpc_server(settings, metrics, database_health, tracer, reuse_port=reuse_port)
    # GetProduct is served from memory, kept current by PostgreSQL's NOTIFY (see
    # server/services/product_cache.py); use cases drop what they change before answering.
    product_cache = ProductCache(
        settings.product_cache_size,
        on_listening=lambda listening: metrics.product_cache_listening.set(1 if listening else 0),
    )
    provider = _circuit_breaker(stripe_provider, settings, metrics)
    # Work in flight holds a payment or refund away from the reconciler for this long: one
    # provider call with every retry, plus the grace period the operator chose.
    lease_seconds = settings.reconcile_after_seconds + stripe_provider.longest_call_seconds
    use_cases = wire_use_cases(
        engine,
        hot_path,
        provider,
        payment_window_seconds=settings.order_payment_timeout_seconds,
        lease_seconds=lease_seconds,
        recheck_seconds=settings.reconcile_after_seconds,
        background_batch_size=settings.background_batch_size,
        products_changed=product_cache.forget,
        on_orders_placed=metrics.orders_placed.inc,
        on_payment_answered=lambda status: metrics.payments_answered.labels(status.value).inc(),
        outbox_writes=settings.outbox_writes,
    )
    if settings.database_replica_url:
        # ListProducts and GetProduct misses on the replica; every write, order and
        # payment, and the cache's listener stay on the primary (server/db/replica.py).
        replica = _engine(settings, settings.database_replica_url)
        running.push_async_callback(replica.dispose)
        use_cases.catalog.read_from_replica(replica)
    product_lookup = _add_catalog_service(
        server, use_cases.catalog, product_cache, settings, metrics
    )
    order_committer = _add_order_and_payment_services(server, use_cases, settings, metrics, tracer)
    # NATS is connected in the background: the server serves without it (server/events/).
    nats_connection = NatsConnection(settings.nats_url)
    consumers = _consumers(
        nats_connection,
        ConsumerContext(
            settings=settings,
            engine=engine,
            inbox=Inbox(engine),
            use_cases=use_cases,
            metrics=metrics,
            products_changed=product_cache.forget,
        ),
        settings,
        tracer,
    )
    dead_letter_service_pb2_grpc.add_DeadLetterServiceServicer_to_server(
        DeadLetterServicer(DeadLetters(nats_connection, engine, consumers.specs)), server
    )
    _add_health_service(server, health_servicer)
    port = _listen(server, settings)

    await hot_path.open()
    product_lookup.start()
    running.push_async_callback(product_lookup.stop)
    order_committer.start()
    running.push_async_callback(order_committer.stop)
    # Before it starts, so that the server stops before the runners its calls still need,
    # and after NOT_SERVING and the listener, registered next.
    running.push_async_callback(server.stop, settings.shutdown_grace_seconds)
    # Between NOT_SERVING and closing the port: a load balancer's health check (Envoy's,
    # every second) takes the replica out of rotation while it still serves what arrives.
    running.push_async_callback(asyncio.sleep, _leave_rotation_seconds(settings))
    running.push_async_callback(database_health.shut_down)
    # Without a cache there is nothing to keep current: no listener connection.
    if settings.product_cache_size:
        _run_in_background(
            running,
            follow_product_changes(
                dedicated_connection_of(settings),
                product_cache,
                warm_from=use_cases.catalog.list_products,
                queue_usage=metrics.notification_queue_usage.set,
            ),
            name="product-changes",
        )
    await server.start()
    await database_health.check_once()
    _run_in_background(
        running, use_cases.upkeep.run_forever(settings.background_interval_seconds), name="upkeep"
    )
    _run_in_background(running, database_health.run(), name="database-health")
    # Stopped in the reverse order: the consumers and the relay before their connection.
    _run_in_background(running, nats_connection.run(), name="nats")
    if with_relay:
        relay = relay_from_settings(
            settings, nats_connection, OutboxMetrics.create(metrics.registry), tracer
        )
        _run_in_background(running, relay.run(), name="relay")
        # One count per server is enough: it goes where the relay goes.
        _run_in_background(
            running,
            count_dead_letters(nats_connection, DeadLetterMetrics.create(metrics.registry)),
            name="dead-letters",
        )
    _run_in_background(running, consumers.run(), name="consumers")
    return port


def _leave_rotation_seconds(settings: Settings) -> float:
    """SHUTDOWN_DELAY: 0 unless a load balancer health-checks the server."""
    delay: float = settings.shutdown_delay_seconds
    return delay


def _run_in_background(
    running: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None], *, name: str
) -> None:
    running.push_async_callback(stop_task, asyncio.create_task(work, name=name))


def _engine(settings: Settings, url: str | None = None) -> AsyncEngine:
    return create_engine(
        url or settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout_seconds=settings.db_pool_timeout_seconds,
        connect_timeout_seconds=settings.db_connect_timeout_seconds,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )


def _hot_path_pool(settings: Settings) -> DriverPool:
    """psycopg's own pool, for the order transaction and product lookups (see
    server/db/driver.py). Only the group-commit runners use it, at most one connection each:
    one per order runner, one for product lookups, and one spare, which measured faster
    (7f217f5)."""
    return DriverPool(
        settings.database_url,
        size=settings.order_batch_runners + 2,
        timeout_seconds=settings.db_pool_timeout_seconds,
        connect_timeout_seconds=settings.db_connect_timeout_seconds,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )


def _consumers(
    nats_connection: NatsConnection,
    context: ConsumerContext,
    settings: Settings,
    tracer: Tracer | None,
) -> Consumers:
    return Consumers(
        nats_connection,
        consumer_specs(context),
        ConsumerSettings(
            max_deliver=settings.consumer_max_deliver,
            ack_wait_seconds=settings.consumer_ack_wait_seconds,
            retry_delay_seconds=settings.consumer_retry_delay_seconds,
        ),
        ConsumerMetrics.create(context.metrics.registry),
        tracer=tracer,
    )


def _stripe_provider(settings: Settings, tracer: Tracer | None) -> StripeProvider:
    return StripeProvider(
        api_key=settings.stripe_api_key,
        api_base=settings.stripe_api_base,
        timeout_seconds=settings.provider_timeout_seconds,
        max_attempts=settings.provider_max_attempts,
        tracer=tracer,
    )


def _circuit_breaker(
    stripe_provider: StripeProvider, settings: Settings, metrics: Metrics
) -> GuardedProvider:
    return GuardedProvider(
        stripe_provider,
        threshold=settings.provider_breaker_threshold,
        reset_seconds=settings.provider_breaker_reset_seconds,
        on_state_change=lambda name, state: metrics.provider_circuit_open.labels(name).set(
            1 if state == "opened" else 0
        ),
    )


def _grpc_server(
    settings: Settings,
    metrics: Metrics,
    database_health: DatabaseHealth,
    tracer: Tracer | None,
    *,
    reuse_port: bool,
) -> grpc.aio.Server:
    verifier = TokenVerifier(
        secret=settings.jwt_secret,
        public_key_file=settings.jwt_public_key_file,
        jwks_file=settings.jwt_jwks_file,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_seconds=settings.jwt_leeway_seconds,
    )
    return grpc.aio.server(
        interceptors=[
            RequestContextInterceptor(
                verifier=verifier,
                policies=ACCESS_POLICIES,
                metrics=metrics,
                calls=InFlightBudget(
                    ErrorReason.TOO_MANY_CALLS, total=settings.max_concurrent_rpcs
                ),
                streams=InFlightBudget(
                    ErrorReason.TOO_MANY_STREAMS,
                    total=settings.max_concurrent_streams,
                    per_peer=settings.max_streams_per_peer,
                ),
                # While the database is known down, calls that need it fail at once.
                admit=database_health.admit,
                tracer=tracer,
            )
        ],
        # Not grpc's maximum_concurrent_rpcs: it counts calls and streams together, so
        # streams nobody closes took every place; the interceptor keeps a budget for each.
        # Alone, a second server on a taken port must fail, not silently share it; as a
        # worker, sharing the port with its siblings is the point.
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", settings.grpc_max_receive_bytes),
            ("grpc.max_send_message_length", settings.grpc_max_send_bytes),
            # grpc refuses metadata over the soft limit at random and all of it over the hard
            # one: one limit, refused always.
            ("grpc.max_metadata_size", settings.grpc_max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", settings.grpc_max_metadata_bytes),
        ],
    )


def _listen(server: grpc.aio.Server, settings: Settings) -> int:
    """Adds the gRPC port, with TLS when a certificate is configured; returns the port."""
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return server.add_insecure_port(address)
    client_ca = settings.tls_client_ca_file
    credentials = grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )
    return server.add_secure_port(address, credentials)


def _tls_mode(settings: Settings) -> str:
    if settings.tls_cert_file is None:
        return "off"
    return "on" if settings.tls_client_ca_file is None else "mutual"


def _add_catalog_service(
    server: grpc.aio.Server,
    catalog: Catalog,
    product_cache: ProductCache,
    settings: Settings,
    metrics: Metrics,
) -> GroupCommitter[str, Product]:
    """Returns the product lookup's runner, to start."""
    # Misses share one `WHERE id = ANY(...)` query: per call, the database round trip and
    # driver work are the dominant cost of a cheap read.
    product_lookup: GroupCommitter[str, Product] = GroupCommitter(
        product_cache.read_through(catalog.get_products),
        max_batch=settings.order_batch_max,
        runners=1,
        on_batch=metrics.batch_size.labels("product_reads").observe,
    )
    get_product = served_from(
        product_cache,
        product_lookup.submit,
        hit=metrics.product_cache_lookups.labels("hit").inc,
        miss=metrics.product_cache_lookups.labels("miss").inc,
    )
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(
        CatalogServicer(catalog, get_product), server
    )
    return product_lookup


def _add_order_and_payment_services(
    server: grpc.aio.Server,
    use_cases: UseCases,
    settings: Settings,
    metrics: Metrics,
    tracer: Tracer | None,
) -> GroupCommitter[tuple[Customer, OrderRequest], Order]:
    """Returns the order batches' runners, to start."""
    handler: Callable[
        [Sequence[tuple[Customer, OrderRequest]]], Awaitable[Sequence[Order | DomainError]]
    ] = use_cases.placement.place_orders
    batches: GroupCommitTracing[tuple[Customer, OrderRequest]] | None = None
    if tracer is not None:
        # The batch's transaction and order.created events join their callers' traces.
        batches = GroupCommitTracing(tracer, "place_orders")
        handler = batches.handler(handler)
    # Concurrent CreateOrder calls share transactions (group commit): under a flash sale the
    # hot product's row lock is taken once per batch instead of once per order.
    order_committer: GroupCommitter[tuple[Customer, OrderRequest], Order] = GroupCommitter(
        handler,
        max_batch=settings.order_batch_max,
        runners=settings.order_batch_runners,
        on_batch=metrics.batch_size.labels("orders").observe,
    )
    submit: Callable[[tuple[Customer, OrderRequest]], Awaitable[Order]] = order_committer.submit
    if batches is not None:
        submit = batches.submit(submit)
    order_pb2_grpc.add_OrderServiceServicer_to_server(
        OrderServicer(submit, use_cases.order_reads, use_cases.cancellation),
        server,
    )
    payment_pb2_grpc.add_PaymentServiceServicer_to_server(
        PaymentServicer(
            use_cases.charging,
            use_cases.refunds,
            use_cases.payment_reads,
            use_cases.provider_events,
            StripeWebhooks(settings.stripe_webhook_secret),
        ),
        server,
    )
    return order_committer


def _add_health_service(
    server: grpc.aio.Server, health_servicer: health.aio.HealthServicer
) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            CATALOG_SERVICE,
            ORDER_SERVICE,
            PAYMENT_SERVICE,
            DEAD_LETTER_SERVICE,
            HEALTH_SERVICE,
            reflection.SERVICE_NAME,
        ),
        server,
    )


def _freeze_long_lived_objects() -> None:
    """Everything allocated while starting (modules, protobuf descriptors, SQLAlchemy
    metadata) lives as long as the process: frozen out of the collector's reach, it is no
    longer walked by every full collection, which stalled the event loop under load
    (docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()


def main(settings: Settings, *, reuse_port: bool, with_relay: bool = True) -> None:
    if settings.event_loop == "uvloop":
        import uvloop

        # uvloop's C event loop roughly halves the per-call cost of asyncio's own
        # bookkeeping (socket readiness, callbacks), which dominates a cheap RPC.
        uvloop.run(serve(settings, reuse_port=reuse_port, with_relay=with_relay))
    else:
        asyncio.run(serve(settings, reuse_port=reuse_port, with_relay=with_relay))
