"""The deployment artefacts under docs/deploy/: the Prometheus alert rules (checked and
unit-tested by promtool), the Grafana dashboard (regenerated from its code), and the
Kubernetes manifests (validated offline against a pinned Kubernetes version); and every
metric the rules, the dashboard and the autoscaler name is one the server exports.

Without promtool (Debian's `prometheus` package) the promtool tests fail with the command
that installs it; MARKETPLACE_SKIP_PROMTOOL=1 skips them instead (never in CI)."""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import runpy
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from server.events.consumers import ConsumerMetrics
from server.events.dead_letters import DeadLetterMetrics
from server.events.relay import OutboxMetrics
from server.notifications.consumer import NotificationMetrics
from server.observability import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "docs" / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD_CODE = DEPLOY / "grafana" / "dashboard.py"
DASHBOARD_JSON = DEPLOY / "grafana" / "dashboard.json"
KUBERNETES = DEPLOY / "kubernetes"
# The oldest Kubernetes release still supported upstream when these were written: what
# they use (gRPC probes, autoscaling/v2, policy/v1) is older than it.
KUBERNETES_VERSION = "1.33.0"
SKIP_PROMTOOL = "MARKETPLACE_SKIP_PROMTOOL"
# Prometheus's own series for every target it scrapes.
SCRAPE_SERIES = frozenset({"up"})
_METRIC_TYPES = frozenset({"Counter", "Gauge", "Histogram", "Summary"})


# --- what the server exports ------------------------------------------------------------


def _server_registry() -> CollectorRegistry:
    """Every metric family, registered as server/app.py registers them at startup."""
    metrics = Metrics.create()
    OutboxMetrics.create(metrics.registry)
    ConsumerMetrics.create(metrics.registry)
    NotificationMetrics.create(metrics.registry)
    DeadLetterMetrics.create(metrics.registry)
    return metrics.registry


def _series_names(family: str, kind: str) -> set[str]:
    """The names a family's samples carry in the exposition; `_created` is left out, as
    the supervisor's multiprocess exposition has none."""
    if kind == "counter":
        return {f"{family}_total"}
    if kind == "histogram":
        return {f"{family}_bucket", f"{family}_count", f"{family}_sum"}
    if kind == "summary":
        return {family, f"{family}_count", f"{family}_sum"}
    return {family}


@cache
def exported_series() -> frozenset[str]:
    names: set[str] = set()
    for family in _server_registry().collect():
        names |= _series_names(family.name, family.type)
    return frozenset(names) | SCRAPE_SERIES


def _declared_metrics() -> Iterator[tuple[str, str]]:
    """(file, name) of every Counter/Gauge/Histogram/Summary("name", ...) in server/."""
    for path in sorted((REPO / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            if called in _METRIC_TYPES and isinstance(first, ast.Constant):
                yield str(path.relative_to(REPO)), str(first.value)


def test_the_registry_here_has_every_metric_the_server_declares() -> None:
    """So that a metric added in server/ without being added to _server_registry() fails
    here rather than passing for not exported."""
    families = {family.name for family in _server_registry().collect()}
    declared = list(_declared_metrics())
    assert len(declared) >= 15, declared
    missing = [
        (where, name) for where, name in declared if name.removesuffix("_total") not in families
    ]
    assert not missing, f"add their metrics class to _server_registry(): {missing}"


# --- metric names in PromQL -------------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions or
    aggregations (followed by a parenthesis), keywords, label names or strings."""
    # Strings first: a label value may hold braces or brackets.
    bare = _STRINGS.sub('""', expr)
    bare = _GROUPING.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", bare)))
    return {
        match.group(1)
        for match in _IDENTIFIER.finditer(bare)
        if match.group(2) is None and match.group(1).lower() not in _KEYWORDS
    }


def test_metric_names_are_read_from_promql_without_functions_labels_or_strings() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (method, le) (rate(marketplace_rpc_seconds_bucket"
        '{job="marketplace", method!~"/grpc\\\\..*{x}"}[5m] offset 1h))) > 0.25'
        ' and on(instance) up{job="marketplace"} == 0'
        " or absent(marketplace_dead_letters) / ignoring(code) group_left(le) 1e3"
    )
    assert metric_names(expr) == {
        "marketplace_rpc_seconds_bucket",
        "up",
        "marketplace_dead_letters",
    }


def _unexported(exprs: dict[str, str]) -> dict[str, set[str]]:
    """Each expression's metric names that the server does not export; an expression that
    names no metric at all is reported too (the parser missed it)."""
    found = {where: metric_names(expr) for where, expr in exprs.items()}
    return {
        where: (names - exported_series()) or {"<no metric>"}
        for where, names in found.items()
        if not names or names - exported_series()
    }


def test_a_misspelt_or_unsuffixed_metric_is_caught() -> None:
    assert _unexported(
        {
            "typo": "rate(marketplace_rpc_totl[5m])",
            "counter without _total": "rate(marketplace_orders_placed[5m])",
            "histogram without _bucket": "marketplace_rpc_seconds > 1",
            "fine": "rate(marketplace_orders_placed_total[5m])",
        }
    ) == {
        "typo": {"marketplace_rpc_totl"},
        "counter without _total": {"marketplace_orders_placed"},
        "histogram without _bucket": {"marketplace_rpc_seconds"},
    }


# --- Prometheus alert rules ---------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]


def _promtool() -> str:
    if found := shutil.which("promtool"):
        return found
    if os.environ.get(SKIP_PROMTOOL) == "1":
        pytest.skip(f"no promtool, and {SKIP_PROMTOOL}=1 skips its tests")
    pytest.fail(
        "the alert rules are checked with promtool, from Debian's prometheus package:"
        f" sudo apt-get install prometheus (or {SKIP_PROMTOOL}=1 skips them explicitly,"
        " never in CI)",
        pytrace=False,
    )


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_accepts_the_rules() -> None:
    checked = _run(_promtool(), "check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in checked.stdout


def test_each_alert_fires_when_it_should_and_not_otherwise() -> None:
    tested = _run(_promtool(), "test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # promtool passes alerts nobody tests: each must be expected once firing and once not.
    firing: set[str] = set()
    silent: set[str] = set()
    for case in _yaml(ALERT_TESTS)["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules()}
    assert alerts >= {
        "MarketplaceErrorRatioHigh",
        "MarketplaceLatencyHigh",
        "MarketplaceDatabaseUnavailable",
        "MarketplacePaymentCircuitOpen",
        "MarketplaceOutboxLagging",
        "MarketplaceDeadLettersWaiting",
        "MarketplaceNotificationQueueFilling",
        "MarketplaceReplicaDown",
    }
    assert alerts - firing == set(), "never tested firing"
    assert alerts - silent == set(), "never tested staying silent"


def test_the_rules_name_only_metrics_the_server_exports() -> None:
    assert _unexported({rule["alert"]: rule["expr"] for rule in _rules()}) == {}


def test_prometheus_scrapes_the_job_the_rules_expect_and_loads_them() -> None:
    # Debian's promtool is built without Kubernetes discovery, so `check config` cannot
    # read this file; the rules' job label and the rule file are what must agree.
    config = _yaml(SCRAPE_CONFIG)
    assert [job["job_name"] for job in config["scrape_configs"]] == ["marketplace"]
    assert config["rule_files"] == [ALERTS.name]
    for rule in _rules():
        if "up{" in rule["expr"]:
            assert 'job="marketplace"' in rule["expr"]


# --- Grafana dashboard --------------------------------------------------------------------


def _dashboard_code() -> dict[str, Any]:
    return runpy.run_path(str(DASHBOARD_CODE))


def test_the_committed_dashboard_is_what_its_code_writes() -> None:
    written = _dashboard_code()["dashboard_json"]()
    assert DASHBOARD_JSON.read_text() == written, (
        "dashboard.json is stale: .venv/bin/python docs/deploy/grafana/dashboard.py"
    )


def test_the_dashboard_queries_only_metrics_the_server_exports() -> None:
    panels = json.loads(DASHBOARD_JSON.read_text())["panels"]
    queries = {
        f"{panel['title']} {target['refId']}": target["expr"]
        for panel in panels
        for target in panel["targets"]
    }
    assert len(panels) >= 10
    assert _unexported(queries) == {}
    used = set().union(*(metric_names(expr) for expr in queries.values()))
    # Every figure an alert watches has a panel.
    alerted = set().union(*(metric_names(rule["expr"]) for rule in _rules()))
    assert alerted - used == set()


# --- Kubernetes manifests -----------------------------------------------------------------


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, document)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def _manifest(kind: str, name: str) -> dict[str, Any]:
    [found] = [
        document
        for _file, document in _manifests()
        if document["kind"] == kind and document["metadata"]["name"] == name
    ]
    return found


def test_the_manifests_are_valid_kubernetes_resources() -> None:
    manifests = _manifests()
    kinds = {document["kind"] for _file, document in manifests}
    assert kinds >= {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for file, document in manifests:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{file}: {document['kind']} {document['metadata']['name']}: {error}")


def test_the_validator_refuses_a_field_kubernetes_does_not_have() -> None:
    """Strict validation from the schemas kubernetes-validate ships (no network): a
    misspelt probe field is an error, not ignored."""
    deployment = copy.deepcopy(_manifest("Deployment", "marketplace-server"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["servce"] = ""
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_server_deployment_probes_health_and_outlasts_its_drain() -> None:
    pod = _manifest("Deployment", "marketplace-server")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    grpc_port = int(env["GRPC_PORT"])
    assert container["readinessProbe"]["grpc"]["port"] == grpc_port
    assert container["startupProbe"]["grpc"]["port"] == grpc_port
    assert pod["terminationGracePeriodSeconds"] > float(env["SHUTDOWN_GRACE"])
    assert int(env["SERVER_WORKERS"]) == int(container["resources"]["requests"]["cpu"])
    assert container["envFrom"] == [{"secretRef": {"name": "marketplace-server"}}]


def test_the_autoscaler_scales_on_a_metric_the_adapter_makes_from_an_exported_one() -> None:
    hpa = _manifest("HorizontalPodAutoscaler", "marketplace-server")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "marketplace-server"
    [pods_metric] = [
        metric["pods"] for metric in hpa["spec"]["metrics"] if metric["type"] == "Pods"
    ]
    adapter = yaml.safe_load(
        _manifest("ConfigMap", "prometheus-adapter-marketplace")["data"]["config.yaml"]
    )
    served = {rule["name"]["as"]: rule["seriesQuery"] for rule in adapter["rules"]}
    assert pods_metric["metric"]["name"] in served
    assert _unexported(served) == {}
    pdb = _manifest("PodDisruptionBudget", "marketplace-server")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
