"""Prometheus metrics of the inference worker (served on TAGPIPE_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCHES = Counter("tagpipe_inference_batches_total", "Batches run through the model")
BATCH_SIZE = Histogram(
    "tagpipe_inference_batch_size",
    "Images per batch: low under load means max_wait_ms is too short or replicas too many",
    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256),
)
BATCH_SECONDS = Histogram(
    "tagpipe_inference_batch_seconds",
    "Session time per batch (onnxruntime only, not queueing)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RESULTS = Counter(
    "tagpipe_inference_results_total",
    "Results written, by status and code (duplicates from redeliveries not included)",
    ["status", "code"],
)
DUPLICATES = Counter(
    "tagpipe_inference_duplicate_results_total",
    "Redelivered items whose result was already stored (acked, not written again)",
)
INFER_FAILURES = Counter(
    "tagpipe_inference_failures_total", "Batches whose session call raised (NAKed or final)"
)
STORE_RETRIES = Counter(
    "tagpipe_inference_store_retries_total", "Result writes retried while Redis was unreachable"
)
QUEUE_SECONDS = Histogram(
    "tagpipe_inference_queue_wait_seconds",
    "Infer-stream wait per item: published by the downloader to pulled into a batch",
    ["lane"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
INFLIGHT = Gauge(
    "tagpipe_inference_inflight_items",
    "Items pulled and not yet acked (decoding, waiting for the session, running, storing)",
)
