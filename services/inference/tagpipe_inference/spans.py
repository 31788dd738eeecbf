"""Tracing a batch that serves many traces.

A batch mixes items from many requests and jobs, so it cannot be a child of
any one of them. It gets a trace of its own (`infer_batch`) with a span link
to every item's trace, and each item's trace gets its own short spans (queue
wait, its share of the batch, the result write) so that a single image's
trace reads gateway -> downloader -> inference -> Redis with nothing missing.

The times are measured by the worker (the session runs on another thread), so
every span here is recorded after the fact with explicit start and end times.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import trace
from tagpipe_common import telemetry

from tagpipe_inference import metrics

_tracer = telemetry.tracer("tagpipe.inference")


def _unsampled(ctx: otel_context.Context | None) -> bool:
    """An item whose trace was sampled out upstream: its spans would be dropped
    anyway (parent-based sampling), so the per-item span work is skipped."""
    span_ctx = trace.get_current_span(ctx).get_span_context()
    return span_ctx.is_valid and not span_ctx.trace_flags.sampled


@dataclass
class BatchTrace:
    """The trace context each item of one batch arrived with, by item id."""

    contexts: dict[str, otel_context.Context] = field(default_factory=dict)

    def add(self, item_id: str, headers: Mapping[str, str] | None) -> None:
        self.contexts[item_id] = telemetry.extract_context(headers)

    def context(self, item_id: str) -> otel_context.Context | None:
        return self.contexts.get(item_id)

    def queue_wait(self, item_id: str, lane: str, enqueued_at: float, fetched_at: float) -> None:
        """Downloader publish -> pulled into this batch: a span and the histogram."""
        metrics.QUEUE_SECONDS.labels(lane).observe(max(0.0, fetched_at - enqueued_at))
        if _unsampled(ctx := self.contexts.get(item_id)):
            return
        telemetry.record_span(
            _tracer,
            "infer_queue_wait",
            enqueued_at,
            fetched_at,
            context=ctx,
        )

    def inference(self, item_ids: list[str], start_s: float, end_s: float) -> None:
        """The batch span (linked to every item) and each item's share of it."""
        links = [
            link
            for i in item_ids
            if i in self.contexts and (link := telemetry.link_to(self.contexts[i])) is not None
        ]
        size = len(item_ids)
        batch = telemetry.record_span(
            _tracer,
            "infer_batch",
            start_s,
            end_s,
            context=otel_context.Context(),  # a root: it belongs to no single item
            attributes={"tagpipe.batch_size": size},
            links=links,
        )
        for item_id in item_ids:
            if _unsampled(self.contexts.get(item_id)):
                continue
            telemetry.record_span(
                _tracer,
                "inference",
                start_s,
                end_s,
                context=self.contexts.get(item_id),
                attributes={"tagpipe.batch_size": size},
                links=[trace.Link(batch)],
            )

    def result_write(self, item_ids: list[str], start_s: float, end_s: float) -> None:
        """One pipelined write serves the batch; each item's trace shows it."""
        for item_id in item_ids:
            if _unsampled(self.contexts.get(item_id)):
                continue
            telemetry.record_span(
                _tracer, "result_write", start_s, end_s, context=self.contexts.get(item_id)
            )
