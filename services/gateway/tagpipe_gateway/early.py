"""Refusing a real-time request before it costs anything.

Past capacity most real-time requests are refused, and on a small box the cost
of refusing them competes with the pipeline for the same cores. Through FastAPI
a refusal paid for the routing, the dependencies, the query validation, the
body read and parse and two middlewares before admission even ran (about 2.5 ms
of CPU a request, profiled at 3x capacity on 2 cores). This ASGI middleware
answers `POST /v1/tags` 429 from the query string alone, before any of that:
the request's deadline (`timeout_ms`, else the gateway's default) against the expected
wait of one more item. The route checks again with the real item count (a body
may carry several URLs), so this is only ever the cheaper of two equal answers.

A request this middleware cannot judge (no runtime yet, a `timeout_ms` that is
not a number or above the maximum) goes on to the route, which answers it. So
does one without a valid API key when keys are on: it gets its 401 from the
route, and a stranger learns nothing about the pipeline's load.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send
from tagpipe_common.subjects import Lane

from tagpipe_gateway.admission import Verdict, admit
from tagpipe_gateway.auth import bearer_token
from tagpipe_gateway.metrics import BACKPRESSURE, DEADLINES, REQUESTS
from tagpipe_gateway.problems import ProblemCode, ProblemError, problem_response

if TYPE_CHECKING:
    from tagpipe_gateway.runtime import Runtime

PATH = "/v1/tags"
TITLE = "Expected wait exceeds the deadline"


def verdict(rt: Runtime, items: int, deadline_s: float) -> Verdict:
    """Would `items` more real-time items make `deadline_s`? The expected wait may fill
    only `admission_wait_share` of it: the estimate is a mean, the deadline a bound."""
    budget_s = deadline_s * rt.settings.admission_wait_share
    return admit(rt.backlog.realtime, items, rt.backlog.drain.rate, budget_s)


def refused(v: Verdict, items: int, deadline_s: float) -> ProblemError:
    """Count a refusal, and the problem that answers it."""
    BACKPRESSURE.labels("realtime_wait_429").inc()
    DEADLINES.labels(Lane.REALTIME.value, "rejected").inc(items)
    wait = "an unbounded" if v.expected_wait_s is None else f"about {v.expected_wait_s:.1f} s of"
    return ProblemError(
        429,
        ProblemCode.BACKLOG_FULL,
        TITLE,
        f"{wait} real-time work is queued ahead; the deadline is {deadline_s:.3g} s",
        headers={"Retry-After": str(v.retry_after_s)},
    )


def deadline_of(query: bytes, default_s: float, most_s: float) -> float | None:
    """The deadline a query string asks for (`default_s` when none); None when the
    route must judge it."""
    if b"timeout_ms" not in query:
        return default_s
    values = parse_qs(query.decode("latin-1")).get("timeout_ms", [])
    try:
        ms = int(values[-1]) if values else None
    except ValueError:
        return None
    if ms is None or not 1 <= ms <= most_s * 1000:
        return None
    return ms / 1000.0


class EarlyAdmission:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == PATH:
            problem = await self._judge(scope)
            if problem is not None:
                await _send_problem(scope, receive, send, problem)
                return
        await self.app(scope, receive, send)

    async def _judge(self, scope: Scope) -> ProblemError | None:
        rt: Runtime | None = getattr(scope["app"].state, "runtime", None)
        if rt is None or not _authorised(rt, scope):
            return None
        settings = rt.settings
        deadline_s = deadline_of(
            scope["query_string"], settings.default_deadline_s, settings.realtime_timeout_s
        )
        if deadline_s is None:
            return None
        try:
            await rt.backlog.current()  # keeps the reads (and the drain rate) current
        except Exception:  # a broker away: the route answers that (503) its own way
            return None
        v = verdict(rt, 1, deadline_s)
        return None if v.admit else refused(v, 1, deadline_s)


def _authorised(rt: Runtime, scope: Scope) -> bool:
    """Whether the route would let this request in (keys off, or a valid bearer key)."""
    if not rt.api_keys.enabled:
        return True
    header = dict(scope["headers"]).get(b"authorization")
    token = bearer_token(header.decode("latin-1") if header else None)
    return token is not None and rt.api_keys.check(token)


async def _send_problem(scope: Scope, receive: Receive, send: Send, exc: ProblemError) -> None:
    """The route's 429, rendered by the same `problem_response`. The id is made here:
    this middleware sits outside the one that gives every other request its id."""
    request_id = uuid.uuid4().hex
    response = problem_response(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        instance=PATH,
        headers={**exc.headers, "X-Request-Id": request_id},
        request_id=request_id,
    )
    await response(scope, receive, send)
    REQUESTS.labels(PATH, "POST", str(exc.status)).inc()
