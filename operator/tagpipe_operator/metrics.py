"""The operator's Prometheus metrics, defined once with fixed label sets."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

_LABELS = ("namespace", "pipeline", "stage")

BACKLOG = Gauge("tagpipe_operator_backlog", "Backlog (pending + ack-pending) per stage", _LABELS)
DESIRED = Gauge("tagpipe_operator_desired_replicas", "Replicas decided by the scaler", _LABELS)
CURRENT = Gauge("tagpipe_operator_current_replicas", "Replicas the Deployment has", _LABELS)
SCALE_EVENTS = Counter(
    "tagpipe_operator_scale_events",
    "Scale decisions that changed replicas",
    ("stage", "direction", "reason"),
)
METRICS_STALE = Counter(
    "tagpipe_operator_metrics_stale", "Ticks on which a backlog could not be read", ("stage",)
)
