"""Helpers for the observability tests: an OTLP/HTTP trace receiver, trace
navigation and Prometheus scraping (see test_observability_stack.py)."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from prometheus_client.parser import text_string_to_metric_families
from tagpipe_cli.servers import free_port

T = TypeVar("T")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- a background event loop for the in-test servers ------------------------


class BackgroundLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# Generous on purpose: it bounds a wait on a loaded 2-core runner, it measures no speed.
WAIT_S = 90.0


def settle(check: Callable[[], T], timeout_s: float = WAIT_S, every_s: float = 0.2) -> T:
    """Run `check` until it stops failing its assertions; past the time, its last failure.

    For values that only converge (spans arriving, counters going up, log lines
    being written): a value that went wrong stays wrong, and fails at the end.
    Unpacking `(x,) = [...]` fails with ValueError, so that counts as not yet.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except (AssertionError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise
        time.sleep(every_s)


# --- an OTLP/HTTP trace receiver ---------------------------------------------


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[str, ...]  # linked trace ids


@dataclass
class Collector:
    """Accepts `POST /v1/traces` (ExportTraceServiceRequest), keeps every span."""

    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._receive)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = trace_service_pb2.ExportTraceServiceRequest()
        export.ParseFromString(body)
        with self.lock:
            self.spans.extend(_spans(export))
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)

    def wait_for(self, pred: Callable[[list[Span]], bool], timeout_s: float = WAIT_S) -> list[Span]:
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.snapshot()
            if pred(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.2)

    def until(self, check: Callable[[list[Span]], T], timeout_s: float = WAIT_S) -> T:
        """`check`'s value once it passes on the spans received so far.

        The wait is the assertions themselves, so it covers everything they
        read: spans reach the collector in batches, per process, in any order
        (the gateway's HTTP server span last, after the response is sent).
        """
        return settle(lambda: check(self.snapshot()), timeout_s)


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def _spans(export: Any) -> Iterator[Span]:
    for rs in export.resource_spans:
        res = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield Span(
                    service=str(res.get("service.name")),
                    name=s.name,
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(),
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                    attributes={a.key: _value(a.value) for a in s.attributes},
                    links=tuple(link.trace_id.hex() for link in s.links),
                )


# --- reading traces and metrics -------------------------------------------------


def trace_of(spans: list[Span], request_id: str) -> list[Span]:
    roots = [
        s
        for s in spans
        if s.name == "tag_request" and s.attributes.get("tagpipe.request_id") == request_id
    ]
    if len(roots) != 1:
        return []
    return [s for s in spans if s.trace_id == roots[0].trace_id]


def ancestors(span: Span, by_id: dict[str, Span]) -> list[tuple[str, str]]:
    """(service, name) of each ancestor, nearest first, up to the `tag_request` span."""
    chain = []
    while span.parent_id and span.name != "tag_request":
        span = by_id[span.parent_id]
        chain.append((span.service, span.name))
    return chain


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(url, timeout=5).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)
