"""Prometheus metrics of the gateway, and the middleware that counts requests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import Counter, Gauge, Histogram
from tagpipe_common.messages import TagResult

REQUESTS = Counter(
    "tagpipe_gateway_requests_total",
    "HTTP requests by route template, method and status",
    ["route", "method", "status"],
)
ITEMS = Counter(
    "tagpipe_gateway_items_total",
    "Items seen finished by this gateway, by lane, final status and code",
    ["lane", "status", "code"],
)
LATENCY = Histogram(
    "tagpipe_gateway_item_latency_seconds",
    "End to end: item submitted at the gateway to result written",
    ["lane"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 7200),
)
INFLIGHT = Gauge(
    "tagpipe_gateway_inflight_requests",
    "HTTP requests being served (a real-time request stays in flight until its tags are back)",
)
BACKPRESSURE = Counter(
    "tagpipe_gateway_backpressure_total",
    "Real-time rejections (429) and bulk pauses caused by the pipeline backlog",
    ["kind"],
)

DEADLINES = Counter(
    "tagpipe_gateway_deadline_items_total",
    "Items with a deadline by outcome: rejected at admission (429), expired (no result "
    "by the deadline, or skipped as deadline_exceeded), served_in_time",
    ["lane", "outcome"],
)


def observe_deadlines(lane: str, results: list[TagResult | None]) -> None:
    late = sum(r is None or r.code == "deadline_exceeded" for r in results)
    DEADLINES.labels(lane, "expired").inc(late)
    DEADLINES.labels(lane, "served_in_time").inc(len(results) - late)


def observe_item(result: TagResult) -> None:
    ITEMS.labels(result.lane.value, result.status, result.code or "").inc()
    LATENCY.labels(result.lane.value).observe(max(0.0, result.finished_at - result.submitted_at))


def install_middleware(app: FastAPI) -> None:
    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        status = 500
        INFLIGHT.inc()
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            INFLIGHT.dec()
            route = request.scope.get("route")
            # The template, never the raw path: ids in paths would explode cardinality.
            path = getattr(route, "path", "unmatched")
            REQUESTS.labels(path, request.method, str(status)).inc()
