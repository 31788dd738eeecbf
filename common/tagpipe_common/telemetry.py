"""Logging, tracing and metrics setup shared by every component.

- Logs are JSON lines carrying component, request/job/item ids and trace id;
  the ids come from context variables so call sites never pass them around.
- The W3C `traceparent` travels in NATS headers; nats-py has no OpenTelemetry
  instrumentation, so `inject_headers` / `extract_context` are the one place
  that propagates it.
- An OTLP exporter is installed only when OTEL_EXPORTER_OTLP_ENDPOINT is set
  (or the console one with TAGPIPE_TRACE_CONSOLE=1); the OTEL_* variables apply.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
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


def setup_tracing(component: str, extra_processor: SpanProcessor | None = None) -> TracerProvider:
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", component)})
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if os.environ.get("TAGPIPE_TRACE_CONSOLE") == "1":
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


def log_item_timings(logger: logging.Logger, result_fields: Mapping[str, Any]) -> None:
    """The one per-item line with stage timings: grep it to see where time went."""
    logger.info("item finished", extra={"fields": {"event": "item_timings", **result_fields}})
