"""The marketplace's Grafana dashboard, as code (grafanalib): the figures the alerts in
docs/deploy/prometheus/alerts.yml watch, and what explains them.

    .venv/bin/python docs/deploy/grafana/dashboard.py   # rewrites dashboard.json beside it

tests/unit/test_deploy.py fails when dashboard.json is not what this writes, or when a query
names a metric the server does not export. Import the JSON in Grafana (Dashboards > Import)
and pick the Prometheus data source that scrapes the servers under job="marketplace".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    Dashboard,
    GridPos,
    Stat,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)

JSON_FILE = Path(__file__).with_name("dashboard.json")
DATA_SOURCE = "${datasource}"
# Health Watch and reflection are long-lived streams: their "latency" is their lifetime.
UNARY = 'job="marketplace", method!~"/grpc\\\\..*"'
DATABASE_SERVICES = 'job="marketplace", method=~"/marketplace\\\\.(catalog|order)\\\\.v1\\\\..*"'
SERVER_FAULTS = (
    'code=~"INTERNAL|UNKNOWN|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|RESOURCE_EXHAUSTED"'
)
_WIDTH = 8
_HEIGHT = 8


def _target(expr: str, legend: str, ref: str = "A") -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref, datasource=DATA_SOURCE)


def _series(title: str, unit: str, *targets: Target, description: str = "") -> TimeSeries:
    return TimeSeries(
        title=title,
        description=description,
        dataSource=DATA_SOURCE,
        targets=list(targets),
        unit=unit,
    )


def _stat(title: str, unit: str, target: Target, description: str = "") -> Stat:
    return Stat(
        title=title,
        description=description,
        dataSource=DATA_SOURCE,
        targets=[target],
        format=unit,
        reduceCalc="lastNotNull",
    )


def panels() -> list[TimeSeries | Stat]:
    """In reading order: is it up, is it answering well, then each part behind it."""
    return [
        _stat(
            "Replicas up",
            "none",
            _target('sum(up{job="marketplace"})', "replicas"),
            "Server replicas answering their /metrics scrape (MarketplaceReplicaDown).",
        ),
        _stat(
            "Database up",
            "none",
            _target('min(marketplace_database_up{job="marketplace"})', "up"),
            "1 while the primary answers every worker's health probe; 0 while any worker's"
            " fails (MarketplaceDatabaseUnavailable).",
        ),
        _stat(
            "Server error ratio",
            "percentunit",
            _target(
                f"sum(rate(marketplace_rpc_total{{{UNARY}, {SERVER_FAULTS}}}[5m]))"
                f" / sum(rate(marketplace_rpc_total{{{UNARY}}}[5m]))",
                "errors",
            ),
            "Calls failing on the server's side (MarketplaceErrorRatioHigh).",
        ),
        _stat(
            "Payment circuit open",
            "none",
            _target('max(marketplace_payment_provider_circuit_open{job="marketplace"})', "open"),
            "1 while any worker's circuit to the payment provider is open.",
        ),
        _series(
            "Calls by code",
            "reqps",
            _target(f"sum by (code) (rate(marketplace_rpc_total{{{UNARY}}}[5m]))", "{{code}}"),
        ),
        _series(
            "p99 latency by method",
            "s",
            _target(
                "histogram_quantile(0.99, sum by (method, le)"
                f" (rate(marketplace_rpc_seconds_bucket{{{UNARY}}}[5m])))",
                "{{method}}",
            ),
            description="MarketplaceLatencyHigh fires above 0.25 s for 10 minutes.",
        ),
        _series(
            "Calls per replica",
            "reqps",
            _target(
                f"sum by (instance) (rate(marketplace_rpc_seconds_count{{{UNARY}}}[5m]))",
                "{{instance}}",
            ),
            description="How evenly the gateway spreads calls over the replicas.",
        ),
        _series(
            "Orders and payments",
            "ops",
            _target('sum(rate(marketplace_orders_placed_total{job="marketplace"}[5m]))', "orders"),
            _target(
                "sum by (status)"
                ' (rate(marketplace_payments_answered_total{job="marketplace"}[5m]))',
                "payments {{status}}",
                "B",
            ),
        ),
        _series(
            "Group commit: calls per transaction (median)",
            "none",
            _target(
                "histogram_quantile(0.5, sum by (batch, le)"
                ' (rate(marketplace_batch_size_bucket{job="marketplace"}[5m])))',
                "{{batch}}",
            ),
            description="Orders per order transaction; small batches cost more CPU per order.",
        ),
        _series(
            "Database unavailable answers",
            "percentunit",
            _target(
                "sum by (instance)"
                f' (rate(marketplace_rpc_total{{{DATABASE_SERVICES}, code="UNAVAILABLE"}}[2m]))'
                " / sum by (instance)"
                f" (rate(marketplace_rpc_total{{{DATABASE_SERVICES}}}[2m]))",
                "{{instance}}",
            ),
            description="Catalog and order calls refused as DATABASE_UNAVAILABLE"
            " (while marketplace_database_up is 0) or cut off by a lost connection.",
        ),
        _series(
            "Outbox",
            "s",
            _target('max(marketplace_outbox_lag_seconds{job="marketplace"})', "lag"),
            _target('max(marketplace_outbox_depth{job="marketplace"})', "depth (events)", "B"),
            description="Age of the oldest event not yet on NATS (MarketplaceOutboxLagging).",
        ),
        _series(
            "Events",
            "ops",
            _target(
                'sum(rate(marketplace_outbox_published_total{job="marketplace"}[5m]))',
                "published",
            ),
            _target(
                "sum by (consumer, outcome)"
                ' (rate(marketplace_consumer_messages_total{job="marketplace"}[5m]))',
                "{{consumer}} {{outcome}}",
                "B",
            ),
        ),
        _series(
            "Dead letters waiting",
            "none",
            _target(
                'max by (consumer) (marketplace_dead_letters{job="marketplace"})', "{{consumer}}"
            ),
            description="In MARKETPLACE_DLQ, for an admin to replay"
            " (MarketplaceDeadLettersWaiting).",
        ),
        _series(
            "PostgreSQL notification queue",
            "percentunit",
            _target('max(marketplace_notification_queue_usage{job="marketplace"})', "usage"),
            description="Full, it fails every order (MarketplaceNotificationQueueFilling).",
        ),
        _series(
            "Product cache",
            "percentunit",
            _target(
                'sum(rate(marketplace_product_cache_lookups_total{job="marketplace",'
                ' result="hit"}[5m])) / sum(rate(marketplace_product_cache_lookups_total'
                '{job="marketplace"}[5m]))',
                "hit ratio",
            ),
            _target(
                'min(marketplace_product_cache_listening{job="marketplace"})', "listening", "B"
            ),
        ),
        _series(
            "Emails",
            "ops",
            _target(
                'sum by (kind) (rate(marketplace_notifications_sent_total{job="marketplace"}[5m]))',
                "sent {{kind}}",
            ),
            _target(
                "sum by (kind)"
                ' (rate(marketplace_notifications_failed_total{job="marketplace"}[5m]))',
                "failed {{kind}}",
                "B",
            ),
            _target(
                "sum by (reason)"
                ' (rate(marketplace_notifications_skipped_total{job="marketplace"}[5m]))',
                "skipped {{reason}}",
                "C",
            ),
        ),
    ]


def dashboard() -> Dashboard:
    laid_out = []
    for index, panel in enumerate(panels()):
        # Three to a row; grafanalib leaves placement to the caller.
        panel.gridPos = GridPos(
            h=_HEIGHT, w=_WIDTH, x=(index % 3) * _WIDTH, y=(index // 3) * _HEIGHT
        )
        laid_out.append(panel)
    return Dashboard(
        title="Marketplace",
        uid="marketplace",
        description="Calls, latency, the database, payments, events and the fleet's replicas",
        tags=["marketplace"],
        timezone="utc",
        refresh="30s",
        time=Time("now-3h", "now"),
        templating=Templating(
            list=[
                Template(
                    name="datasource", query="prometheus", type="datasource", label="Data source"
                )
            ]
        ),
        panels=laid_out,
    ).auto_panel_ids()


def dashboard_json() -> str:
    data: dict[str, Any] = dashboard().to_json_data()
    return json.dumps(data, cls=DashboardEncoder, sort_keys=True, indent=2) + "\n"


if __name__ == "__main__":
    JSON_FILE.write_text(dashboard_json())
    print(f"wrote {JSON_FILE}")
