"""Structured logs (structlog) and Prometheus metrics, configured once at startup."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def configure_logging(
    level: str, log_format: str, extra: Sequence[structlog.types.Processor] = ()
) -> None:
    """`extra`: processors run after the per-call context is merged (tracing's ids)."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *extra,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    rpc_total: Counter
    rpc_seconds: Histogram
    orders_placed: Counter
    payments_answered: Counter
    provider_circuit_open: Gauge
    product_cache_lookups: Counter
    product_cache_listening: Gauge
    batch_size: Histogram
    notification_queue_usage: Gauge
    database_up: Gauge

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            rpc_total=Counter(
                "marketplace_rpc_total", "RPCs handled", ["method", "code"], registry=registry
            ),
            rpc_seconds=Histogram(
                "marketplace_rpc_seconds",
                "RPC latency",
                ["method"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                registry=registry,
            ),
            orders_placed=Counter(
                "marketplace_orders_placed_total", "Orders created", registry=registry
            ),
            payments_answered=Counter(
                "marketplace_payments_answered_total",
                "CreatePayment answers by the payment's status (SUCCEEDED, FAILED, PENDING)",
                ["status"],
                registry=registry,
            ),
            provider_circuit_open=Gauge(
                "marketplace_payment_provider_circuit_open",
                "1 while the payment provider's circuit is open in a worker",
                ["provider"],
                registry=registry,
                multiprocess_mode="livemax",
            ),
            product_cache_lookups=Counter(
                "marketplace_product_cache_lookups_total",
                "GetProduct lookups by result: hit (served from memory) or miss (database)",
                ["result"],
                registry=registry,
            ),
            product_cache_listening=Gauge(
                "marketplace_product_cache_listening",
                "1 while every worker hears product changes and caches products; 0 while any"
                " worker's cache is off (its listener connection is down, or the triggers are)",
                registry=registry,
                multiprocess_mode="livemin",
            ),
            batch_size=Histogram(
                "marketplace_batch_size",
                "Calls served together by group commit: orders per order transaction"
                " (batch=orders), GetProduct misses per database read (batch=product_reads)",
                ["batch"],
                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                registry=registry,
            ),
            notification_queue_usage=Gauge(
                "marketplace_notification_queue_usage",
                "PostgreSQL's pg_notification_queue_usage(), 0 to 1, read by each worker's"
                " product-change listener: a listener anywhere that stops reading keeps the"
                " queue from emptying, and once it is full every change of products (every"
                " order) fails",
                registry=registry,
                multiprocess_mode="livemax",
            ),
            database_up=Gauge(
                "marketplace_database_up",
                "1 while the primary PostgreSQL answers every worker's health probe; 0 while"
                " any worker's probe fails (its calls that need the database are refused)",
                registry=registry,
                # The least of the live workers: one that cannot reach the database is down.
                multiprocess_mode="livemin",
            ),
        )
