"""Logging, tracing and metrics setup shared by every component.

- Logs are JSON lines carrying component, request/job/item ids and trace id;
  the ids come from context variables so call sites never pass them around.
- The W3C `traceparent` travels in NATS headers; nats-py has no OpenTelemetry
  instrumentation, so `inject_headers` / `extract_context` are the one place
  that propagates it.
- An OTLP exporter is installed only when OTEL_EXPORTER_OTLP_ENDPOINT is set
  (or the console one with TAGPIPE_TRACE_CONSOLE=1 or OTEL_TRACES_EXPORTER=console;
  OTEL_TRACES_EXPORTER=none or OTEL_SDK_DISABLED=true turn tracing off); the
  other OTEL_* variables (sampler, resource attributes, batch delays) apply.
- One trace per image: stages that measure work elsewhere (a thread, a batch,
  another process's enqueue time) record it with `record_span`, with explicit
  start and end times, so a queue wait is a real span on the timeline.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
item_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("item_id", default=None)

_component = "tagpipe"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "component": _component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in (("request_id", request_id_var), ("job_id", job_id_var)):
            if (val := var.get()) is not None:
                doc[key] = val
        if (item := item_id_var.get()) is not None:
            doc["item_id"] = item
        span_ctx = trace.get_current_span().get_span_context()
        if span_ctx.is_valid:
            doc["trace_id"] = format(span_ctx.trace_id, "032x")
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            doc.update(extra)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(component: str, level: str = "INFO", json_lines: bool = True) -> None:
    global _component
    _component = component
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {component} %(levelname)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter at INFO drowns the per-item lines that matter.
    for noisy in ("aiohttp.access", "uvicorn.access", "kopf.objects"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _exporters() -> set[str]:
    """Which exporters the environment asks for: otlp, console, or none."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return set()
    named = {e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in named:
        return set()
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        named.add("otlp")
    if env.get("TAGPIPE_TRACE_CONSOLE") == "1":
        named.add("console")
    return named & {"otlp", "console"}


def setup_tracing(component: str, extra_processor: SpanProcessor | None = None) -> TracerProvider:
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", component)})
    provider = TracerProvider(resource=resource)
    exporters = _exporters()
    if "otlp" in exporters:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if "console" in exporters:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    if extra_processor is not None:
        provider.add_span_processor(extra_processor)
    trace.set_tracer_provider(provider)
    return provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Add the current trace context (traceparent, tracestate) to NATS headers."""
    carrier: dict[str, str] = dict(headers or {})
    inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message carried, to parent this stage's spans."""
    return extract(dict(headers or {}))


def _ns(epoch_s: float) -> int:
    return int(epoch_s * 1e9)


def record_span(
    tr: trace.Tracer,
    name: str,
    start_s: float,
    end_s: float,
    *,
    context: otel_context.Context | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    links: Sequence[trace.Link] = (),
) -> trace.SpanContext:
    """A finished span for work timed elsewhere (epoch seconds, as in the messages).

    `context` is the parent (default: the current span); the end never precedes
    the start, so clock skew between hosts cannot produce a negative span.
    """
    span = tr.start_span(
        name, context=context, attributes=attributes, links=links, start_time=_ns(start_s)
    )
    span.end(end_time=_ns(max(start_s, end_s)))
    return span.get_span_context()


def queue_wait_span(
    tr: trace.Tracer, name: str, enqueued_at: float, context: otel_context.Context | None = None
) -> float:
    """Record `enqueued_at -> now` as a span; returns the wait in seconds."""
    now = time.time()
    record_span(tr, name, enqueued_at, now, context=context)
    return max(0.0, now - enqueued_at)


def trace_id_of(ctx: otel_context.Context | None = None) -> str | None:
    """The hex trace id of `ctx` (default: the current span), None outside a trace."""
    span_ctx = trace.get_current_span(ctx).get_span_context()
    return format(span_ctx.trace_id, "032x") if span_ctx.is_valid else None


def link_to(ctx: otel_context.Context) -> trace.Link | None:
    """A span link to the span `ctx` carries (a batch span links to each item's trace)."""
    span_ctx = trace.get_current_span(ctx).get_span_context()
    return trace.Link(span_ctx) if span_ctx.is_valid else None


def log_item_timings(
    logger: logging.Logger,
    result_fields: Mapping[str, Any],
    context: otel_context.Context | None = None,
) -> None:
    """The one per-item line with stage timings: grep it to see where time went.

    `context` is the item's trace when the caller is not inside one of its spans
    (a batch serves many traces); the line carries that trace id.
    """
    fields: dict[str, Any] = {"event": "item_timings", **result_fields}
    if context is not None and (tid := trace_id_of(context)) is not None:
        fields["trace_id"] = tid
    logger.info("item finished", extra={"fields": fields})
