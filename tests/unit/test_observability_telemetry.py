"""tagpipe_common.telemetry: spans timed elsewhere, propagation, the per-item log line."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tagpipe_common import telemetry


@pytest.fixture
def spans() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.name == name]
    return span


def test_record_span_keeps_the_given_times_and_parent(
    spans: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tr, exporter = spans
    with tr.start_as_current_span("parent") as parent:
        ctx = telemetry.record_span(tr, "timed", 1000.25, 1000.75, attributes={"k": 1})
    span = finished(exporter, "timed")
    assert (span.start_time, span.end_time) == (1_000_250_000_000, 1_000_750_000_000)
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert ctx.trace_id == parent.get_span_context().trace_id
    assert span.attributes == {"k": 1}


def test_an_end_before_the_start_is_a_zero_length_span(
    spans: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tr, exporter = spans
    telemetry.record_span(tr, "skewed", 50.0, 49.0)  # another host's clock ran ahead
    span = finished(exporter, "skewed")
    assert span.end_time == span.start_time


def test_the_traceparent_crosses_nats_headers(
    spans: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tr, exporter = spans
    with tr.start_as_current_span("sender") as sender:
        headers = telemetry.inject_headers({"Nats-Msg-Id": "x"})
    assert headers["Nats-Msg-Id"] == "x" and "traceparent" in headers
    ctx = telemetry.extract_context(headers)
    telemetry.queue_wait_span(tr, "wait", 0.0, ctx)
    wait = finished(exporter, "wait")
    assert wait.parent is not None and wait.parent.span_id == sender.get_span_context().span_id
    assert telemetry.trace_id_of(ctx) == format(sender.get_span_context().trace_id, "032x")
    link = telemetry.link_to(ctx)
    assert link is not None and link.context.span_id == sender.get_span_context().span_id
    assert telemetry.link_to(telemetry.extract_context({})) is None
    assert telemetry.trace_id_of(telemetry.extract_context(None)) is None


def test_the_item_line_carries_the_items_trace_id_and_ids(
    spans: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    tr, _ = spans
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(telemetry.JsonFormatter())
    log = logging.getLogger("test.telemetry.item")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    with tr.start_as_current_span("item") as item:
        ctx = trace.set_span_in_context(item)
    token = telemetry.item_id_var.set("i-1")
    try:
        # Outside the item's span (a batch serves many traces): the context names it.
        telemetry.log_item_timings(log, {"status": "ok", "inference_ms": 12.5}, context=ctx)
    finally:
        telemetry.item_id_var.reset(token)
        log.removeHandler(handler)
    doc = json.loads(stream.getvalue())
    assert doc["event"] == "item_timings" and doc["item_id"] == "i-1"
    assert doc["trace_id"] == format(item.get_span_context().trace_id, "032x")
    assert doc["inference_ms"] == 12.5 and doc["level"] == "INFO" and doc["ts"].endswith("Z")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, set()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, {"otlp"}),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, {"otlp"}),
        ({"OTEL_TRACES_EXPORTER": "console"}, {"console"}),
        ({"TAGPIPE_TRACE_CONSOLE": "1"}, {"console"}),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, set()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, set()),
    ],
)
def test_exporters_follow_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: set[str]
) -> None:
    for var in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_SDK_DISABLED",
        "TAGPIPE_TRACE_CONSOLE",
    ):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert telemetry._exporters() == expected
