"""The Grafana dashboard only queries metrics that tagpipe actually exports.

Every PromQL expression in charts/tagpipe/files/dashboard.json is parsed for
metric names, and each must be a series some component's metrics module
defines (histograms as _bucket/_sum/_count, counters as _total), or the
process collector's. A renamed metric then breaks this test, not a panel.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import yaml
from prometheus_client import REGISTRY
from prometheus_client.registry import CollectorRegistry
from tagpipe_operator.render import render
from tagpipe_operator.spec import parse_spec

from tests.tools import ROOT, helm_binary

CHART = ROOT / "charts" / "tagpipe"
DASHBOARD = CHART / "files" / "dashboard.json"
METRIC_MODULES = (
    "tagpipe_gateway.metrics",
    "tagpipe_downloader.metrics",
    "tagpipe_inference.metrics",
    "tagpipe_operator.metrics",
)
# Exported by something other than tagpipe, on purpose: NVIDIA's dcgm-exporter.
EXTERNAL = {"DCGM_FI_DEV_GPU_UTIL"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
PROMQL_WORDS |= {"and", "or", "unless", "inf", "nan"}


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in doc.get("panels", []):
        yield p
        yield from panels(p)  # rows nest their panels


def exprs(doc: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(doc) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (functions, labels and keywords left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors ($__rate_interval too)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", s):
        if m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def exported_names() -> set[str]:
    """Every series name the components' metric modules (and the process collector) define."""
    for module in METRIC_MODULES:
        __import__(module)
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
    }
    names = set()
    registry: CollectorRegistry = REGISTRY
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def test_the_name_parser_finds_metrics_and_skips_the_rest() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(a_seconds_bucket{x="y z"}'
        "[$__rate_interval]))) / on (job) b_total + sum(c) * 2"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}


def test_every_dashboard_query_uses_an_exported_metric() -> None:
    doc = json.loads(DASHBOARD.read_text())
    queries = exprs(doc)
    assert len(queries) >= 20
    used = set().union(*map(metric_names, queries))
    unknown = used - exported_names() - EXTERNAL
    assert not unknown, f"the dashboard queries metrics nothing exports: {sorted(unknown)}"


def test_the_dashboard_covers_the_pipeline() -> None:
    used = set().union(*map(metric_names, exprs(json.loads(DASHBOARD.read_text()))))
    for needed in (
        "tagpipe_gateway_items_total",  # throughput, errors by code
        "tagpipe_gateway_item_latency_seconds_bucket",  # end to end
        "tagpipe_downloader_stage_seconds_bucket",  # per-stage latency
        "tagpipe_inference_queue_wait_seconds_bucket",
        "tagpipe_inference_batch_seconds_bucket",
        "tagpipe_inference_batch_size_bucket",
        "tagpipe_operator_backlog",  # backlog vs replicas
        "tagpipe_operator_desired_replicas",
        "tagpipe_operator_current_replicas",
        "tagpipe_operator_scale_events_total",
        "process_cpu_seconds_total",
    ):
        assert needed in used, needed


def helm_template(*sets: str) -> list[dict[str, Any]]:
    args = [a for s in sets for a in ("--set", s)]
    out = subprocess.run(
        [helm_binary(), "template", "rel", str(CHART), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_the_chart_ships_the_dashboard_for_the_grafana_sidecar() -> None:
    docs = helm_template("dashboard.enabled=true")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "tagpipe.json" in d.get("data", {})]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["tagpipe.json"]) == json.loads(DASHBOARD.read_text())


def test_the_pod_monitor_scrapes_every_pipeline_pod_the_operator_renders() -> None:
    """Without it the dashboard has no gateway/downloader/inference series in a cluster."""
    assert not [d for d in helm_template() if d["kind"] == "PodMonitor"]
    (monitor,) = [
        d for d in helm_template("serviceMonitor.enabled=true") if d["kind"] == "PodMonitor"
    ]
    sel = monitor["spec"]["selector"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}  # pipelines live anywhere
    spec = parse_spec(
        {
            "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
            "nats": {"url": "nats://nats:4222"},
            "redis": {"url": "redis://redis:6379/0"},
        }
    )
    objs = render("tp", "ns", "uid", spec)
    settings = next(o for o in objs if o["kind"] == "ConfigMap")["data"]
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    assert len(deployments) == 3
    for dep in deployments:
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert sel["matchLabels"].items() <= pod_labels.items()
        for expr in sel["matchExpressions"]:
            assert pod_labels[expr["key"]] in expr["values"]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        # The port the monitor names is the one the component serves /metrics on.
        assert ports[endpoint["port"]] == int(settings["TAGPIPE_METRICS_PORT"])
