"""Composition root: builds every collaborator from Settings and runs the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import signal

import grpc
import psycopg
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from marketplace.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from marketplace.order.v1 import order_pb2, order_pb2_grpc
from marketplace.payment.v1 import payment_pb2, payment_pb2_grpc
from server.adapters.stripe_provider import StripeProvider
from server.adapters.stripe_webhooks import StripeWebhooks
from server.api.auth import TokenVerifier
from server.api.catalog import CatalogServicer
from server.api.health import DatabaseHealth
from server.api.interceptor import RequestContextInterceptor
from server.api.orders import OrderServicer
from server.api.payments import PaymentServicer
from server.db.driver import DriverPool
from server.db.engine import connect_options, create_engine, libpq_url
from server.domain.catalog import Product
from server.domain.identity import Access
from server.domain.orders import Order, OrderRequest
from server.observability import Metrics, configure_logging
from server.services.batching import GroupCommitter
from server.services.circuit import GuardedProvider
from server.services.product_cache import ProductCache, follow_product_changes, served_from
from server.services.upkeep import stop_task
from server.services.use_cases import wire_use_cases
from server.settings import Settings

CATALOG_SERVICE = catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name
ORDER_SERVICE = order_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name
PAYMENT_SERVICE = payment_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

# Who may call what. Unlisted unary RPCs need a valid token (deny by default); ownership
# of individual orders is checked by the use cases.
ACCESS_POLICIES: dict[str, Access] = {
    f"/{CATALOG_SERVICE}/ListProducts": Access.PUBLIC,
    f"/{CATALOG_SERVICE}/GetProduct": Access.PUBLIC,
    f"/{CATALOG_SERVICE}/CreateProduct": Access.ADMIN,
    f"/{CATALOG_SERVICE}/UpdateProduct": Access.ADMIN,
    f"/{CATALOG_SERVICE}/AdjustStock": Access.ADMIN,
    f"/{ORDER_SERVICE}/CreateOrder": Access.CUSTOMER,
    f"/{ORDER_SERVICE}/GetOrder": Access.AUTHENTICATED,
    f"/{ORDER_SERVICE}/ListOrders": Access.AUTHENTICATED,
    f"/{ORDER_SERVICE}/CancelOrder": Access.AUTHENTICATED,
    f"/{PAYMENT_SERVICE}/CreatePayment": Access.CUSTOMER,
    f"/{PAYMENT_SERVICE}/GetPayment": Access.AUTHENTICATED,
    f"/{PAYMENT_SERVICE}/ListPayments": Access.AUTHENTICATED,
    f"/{PAYMENT_SERVICE}/RefundPayment": Access.ADMIN,
    # Authenticated by the provider's signature over the body, not by a bearer token.
    f"/{PAYMENT_SERVICE}/HandleProviderWebhook": Access.PUBLIC,
    f"/{HEALTH_SERVICE}/Check": Access.PUBLIC,
    f"/{HEALTH_SERVICE}/List": Access.PUBLIC,
}

_log = structlog.get_logger("marketplace.server")


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    """Runs one server process; `reuse_port` when it is one of several sharing the port."""
    configure_logging(settings.log_level, settings.log_format)
    metrics = Metrics.create()
    # With several workers the supervisor serves /metrics for all of them.
    if settings.metrics_port and not reuse_port:
        start_http_server(settings.metrics_port, addr=settings.grpc_host, registry=metrics.registry)
    engine = create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout_seconds=settings.db_pool_timeout_seconds,
        connect_timeout_seconds=settings.db_connect_timeout_seconds,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )
    # The order transaction and product lookups run on psycopg's own pool (see
    # server/db/driver.py). Only the group-commit runners use it, each holding at most one
    # connection at a time: one per order runner and one for the product-lookup runner,
    # plus one more. Nothing else takes that one, yet without it order-spread ran about 10%
    # slower in three alternating pairs of runs (739-787 against 826-861 orders/s); why is
    # not known.
    hot_path = DriverPool(
        settings.database_url,
        size=settings.order_batch_runners + 2,
        timeout_seconds=settings.db_pool_timeout_seconds,
        connect_timeout_seconds=settings.db_connect_timeout_seconds,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )
    verifier = TokenVerifier(
        secret=settings.jwt_secret,
        public_key_file=settings.jwt_public_key_file,
        jwks_file=settings.jwt_jwks_file,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_seconds=settings.jwt_leeway_seconds,
    )
    server = grpc.aio.server(
        interceptors=[
            RequestContextInterceptor(verifier=verifier, policies=ACCESS_POLICIES, metrics=metrics)
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        # Alone, a second server on a taken port must fail, not silently share it; as a
        # worker, sharing the port with its siblings is the point.
        options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
    )
    # GetProduct is served from memory, kept current by PostgreSQL's NOTIFY (see
    # server/services/product_cache.py); use cases drop what they change before answering.
    product_cache = ProductCache(
        settings.product_cache_size,
        on_listening=lambda listening: metrics.product_cache_listening.set(1 if listening else 0),
    )
    stripe_provider = StripeProvider(
        api_key=settings.stripe_api_key,
        api_base=settings.stripe_api_base,
        timeout_seconds=settings.provider_timeout_seconds,
        max_attempts=settings.provider_max_attempts,
    )
    provider = GuardedProvider(
        stripe_provider,
        threshold=settings.provider_breaker_threshold,
        reset_seconds=settings.provider_breaker_reset_seconds,
        on_state_change=lambda name, state: metrics.provider_circuit_open.labels(name).set(
            1 if state == "opened" else 0
        ),
    )
    # Work in flight holds a payment or refund away from the reconciler for this long: one
    # provider call with every retry (each backoff is capped at 2 s), plus the grace
    # period the operator chose.
    lease_seconds = settings.reconcile_after_seconds + settings.provider_max_attempts * (
        settings.provider_timeout_seconds + 2.0
    )
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
    )
    catalog, upkeep = use_cases.catalog, use_cases.upkeep
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
    # Concurrent CreateOrder calls share transactions (group commit): under a flash sale the
    # hot product's row lock is taken once per batch instead of once per order.
    order_committer: GroupCommitter[tuple[str, OrderRequest], Order] = GroupCommitter(
        use_cases.placement.place_orders,
        max_batch=settings.order_batch_max,
        runners=settings.order_batch_runners,
        on_batch=metrics.batch_size.labels("orders").observe,
    )
    order_pb2_grpc.add_OrderServiceServicer_to_server(
        OrderServicer(order_committer.submit, use_cases.order_reads, use_cases.cancellation),
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
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (CATALOG_SERVICE, ORDER_SERVICE, PAYMENT_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME),
        server,
    )
    database_health = DatabaseHealth(
        health_servicer,
        engine,
        (CATALOG_SERVICE, ORDER_SERVICE, PAYMENT_SERVICE),
        settings.health_check_interval_seconds,
    )

    address = f"{settings.grpc_host}:{settings.grpc_port}"
    port = server.add_insecure_port(address)
    await hot_path.open()
    listener = functools.partial(
        psycopg.AsyncConnection.connect,
        libpq_url(settings.database_url),
        autocommit=True,
        **connect_options(settings.db_connect_timeout_seconds, settings.db_statement_timeout_ms),
        # Over TCP, a peer gone without a FIN is noticed by the kernel too, not only by the
        # listener's heartbeat.
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    )
    # Without a cache there is nothing to keep current: no listener connection.
    product_changes_task = (
        asyncio.create_task(
            follow_product_changes(
                listener,
                product_cache,
                warm_from=catalog.list_products,
                queue_usage=metrics.notification_queue_usage.set,
            ),
            name="product-changes",
        )
        if settings.product_cache_size
        else None
    )
    order_committer.start()
    product_lookup.start()
    await server.start()
    await database_health.check_once()
    health_task = asyncio.create_task(database_health.run(), name="database-health")
    upkeep_task = asyncio.create_task(
        upkeep.run_forever(settings.background_interval_seconds), name="upkeep"
    )
    # Everything allocated so far (modules, protobuf descriptors, SQLAlchemy metadata, about
    # 130,000 objects) lives as long as the process. Frozen out of the collector's reach, a
    # full collection no longer walks them all. Measured under order load: a full collection
    # every several seconds stalled the event loop, and every call in flight, for 80-110 ms;
    # frozen, it takes about 3 ms.
    gc.collect()
    gc.freeze()
    _log.info("listening", address=f"{settings.grpc_host}:{port}")

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()

    _log.info("draining", grace_seconds=settings.shutdown_grace_seconds)
    health_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await health_task
    await stop_task(upkeep_task)
    if product_changes_task is not None:
        await stop_task(product_changes_task)
    await database_health.shut_down()
    await server.stop(settings.shutdown_grace_seconds)
    await order_committer.stop()
    await product_lookup.stop()
    await stripe_provider.aclose()
    await hot_path.close()
    await engine.dispose()
    _log.info("stopped")


def main(settings: Settings, *, reuse_port: bool) -> None:
    if settings.event_loop == "uvloop":
        import uvloop

        # uvloop's C event loop roughly halves the per-call cost of asyncio's own
        # bookkeeping (socket readiness, callbacks), which dominates a cheap RPC.
        uvloop.run(serve(settings, reuse_port=reuse_port))
    else:
        asyncio.run(serve(settings, reuse_port=reuse_port))
