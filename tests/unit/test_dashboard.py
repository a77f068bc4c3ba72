"""Every expression of the Grafana dashboard is valid PromQL and names only series the
sidecar exports, as its metrics registry lists them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import promql_parser
import pytest

from mlflow_sidecar.server.observability import CLIENT_CAUSED_CODES, SidecarMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy").rglob("*.json"))

# Grafana fills these in before Prometheus sees the query.
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# Grafana's template query `label_values(selector, label)` wraps one PromQL selector.
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*\w+\)$")

# What each family type exposes (prometheus_client names counters without `_total`).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_names() -> set[str]:
    """Every series name of a sidecar's registry, with the suffixes of each family's type."""
    metrics = SidecarMetrics()
    metrics.watch_spool(lambda: (0, 0.0, 0, 0))
    metrics.watch_mlflow(lambda: True)
    names = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def expressions(dashboard: dict) -> Iterator[str]:
    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            match = _LABEL_VALUES.match(query)
            yield match.group("selector") if match else query


def metric_names(node: object) -> Iterator[str]:
    """The metric name of every selector in a parsed expression."""
    kind = type(node).__name__
    if kind == "VectorSelector":
        name = getattr(node, "name", None)
        assert name, "a selector without a metric name matches more than the sidecar's series"
        yield name
        return
    for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None:
            yield from metric_names(child)
    args = getattr(node, "args", None)
    if args is not None:
        for arg in getattr(args, "args", args):
            yield from metric_names(arg)


def parse(expression: str) -> object:
    for variable, value in _GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    return promql_parser.parse(expression)


def test_the_walker_finds_every_selector():
    tree = parse(
        "histogram_quantile(0.9, sum by (le) (rate(a_bucket[$__rate_interval])))"
        " / on() group_left max(b) + -(c offset 5m) + max_over_time(d[10m:1m])"
    )
    assert sorted(metric_names(tree)) == ["a_bucket", "b", "c", "d"]


def test_there_is_a_dashboard():
    assert ROOT / "deploy/grafana/mlflow-sidecar.json" in DASHBOARDS


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_expression_names_an_exported_series(path):
    exported = exported_names()
    used: set[str] = set()
    found = list(expressions(json.loads(path.read_text())))
    assert found
    for expression in found:
        names = set(metric_names(parse(expression)))
        assert names, expression
        assert names <= exported, f"{sorted(names - exported)} not exported: {expression}"
        used |= names
    # The dashboard covers the standard gRPC series and the sidecar's MLflow and spool ones.
    assert {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket"} <= used
    assert {"mlflow_sidecar_mlflow_up", "mlflow_sidecar_spool_pending_points"} <= used


def test_error_panels_leave_out_exactly_the_codes_the_caller_caused():
    dashboard = json.loads((ROOT / "deploy/grafana/mlflow-sidecar.json").read_text())
    not_errors = {code.name for code in CLIENT_CAUSED_CODES} | {"OK"}
    excluded = [
        set(match.split("|"))
        for expression in expressions(dashboard)
        for match in re.findall(r'grpc_code!~"([^"]*)"', expression)
    ]
    assert excluded
    assert all(codes == not_errors for codes in excluded)
