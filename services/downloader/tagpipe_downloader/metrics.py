"""Prometheus metrics of the download tier (served on TAGPIPE_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from tagpipe_common.messages import StageTimings

ITEMS = Counter(
    "tagpipe_downloader_items_total",
    "Items finished here, by lane and outcome (published, cached, or the error code)",
    ["lane", "outcome"],
)
DEDUPE = Counter(
    "tagpipe_downloader_dedupe_total",
    "Tag cache look-ups of downloaded bytes (content dedupe), by result: hit or miss",
    ["result"],
)
RETRIES = Counter(
    "tagpipe_downloader_naks_total",
    "Transient failures handed back to JetStream for a later delivery, by code",
    ["code"],
)
INFRA_RETRIES = Counter(
    "tagpipe_downloader_infra_retries_total", "Redis/NATS calls retried while unreachable"
)
INFLIGHT = Gauge("tagpipe_downloader_inflight", "Items being fetched, decoded or published")
STAGE_SECONDS = Histogram(
    "tagpipe_downloader_stage_seconds",
    "Time per stage: queue (enqueue to pull), connect, download, decode, preprocess",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BYTES = Histogram(
    "tagpipe_downloader_body_bytes",
    "Image bytes fetched or read from an upload",
    buckets=(1e4, 5e4, 1e5, 5e5, 1e6, 2e6, 5e6, 1e7, 2e7),
)

_STAGES = {
    "queue": "download_queue_ms",
    "connect": "connect_ms",
    "download": "download_ms",
    "decode": "decode_ms",
    "preprocess": "preprocess_ms",
}


def observe_timings(t: StageTimings) -> None:
    for stage, attr in _STAGES.items():
        ms = getattr(t, attr)
        if ms is not None:
            STAGE_SECONDS.labels(stage).observe(ms / 1000)
