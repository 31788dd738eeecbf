"""A stalled inference tier (SIGSTOP): backpressure reaches the real-time API as 429s,
memory stays bounded in every process, and nothing accepted is lost.

The streams are bounded (`max_msgs`, as the operator sets `stream_max_msgs`):
inference stops consuming, the inference stream fills, downloaders cannot publish
and stop taking downloads, the download backlog grows past the gateway's
real-time limit, and new real-time requests are refused with 429 instead of
queueing without end. With unbounded streams the inference stream would absorb
the whole backlog on disk and the API would never push back.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from tagpipe_cli.stack import Stack

from bench.imageserver import ImageServer
from tests.faults.kit import (
    account,
    assert_exactly_once,
    image_urls,
    process_rss,
    redelivered_duplicates,
    submit_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 600
STREAM_MAX_MSGS = 300
PRESSURE_S = 12  # keep pushing this long after the first 429
MAX_GROWTH_KB = 128 * 1024  # per process, from the first 429 to the end of the stall


class RealtimeLoad:
    """Threads posting 16-URL real-time requests until told to stop."""

    def __init__(self, base_url: str, images: ImageServer, threads: int = 6) -> None:
        self.base_url, self.images, self.threads = base_url, images, threads
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.bad_429: list[str] = []
        self.timed_out: list[str] = []  # request ids of accepted requests that hit 504
        self.pool = ThreadPoolExecutor(threads)

    def start(self) -> None:
        for t in range(self.threads):
            self.pool.submit(self._loop, t)

    def _loop(self, t: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as http:
            k = 0
            while not self.stop.is_set():
                urls = image_urls(self.images, 16, f"rt{t}-{k}")
                k += 1
                r = http.post("/v1/tags", json={"urls": urls})
                with self.lock:
                    self.statuses[r.status_code] += 1
                    if r.status_code == 429 and (
                        r.headers["content-type"] != "application/problem+json"
                        or r.json()["code"] != "backlog_full"
                    ):
                        self.bad_429.append(r.text)
                    if r.status_code == 504:
                        self.timed_out.append(r.json()["request_id"])
                if r.status_code == 429:
                    time.sleep(0.2)

    def finish(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True)


def wait_pending_results(http: httpx.Client, request_ids: list[str], timeout_s: float = 90) -> int:
    """Every item of every timed-out request ends with a result; returns the item count."""
    deadline = time.monotonic() + timeout_s
    items = 0
    for rid in request_ids:
        while True:
            body: dict[str, Any] = http.get(f"/v1/results/{rid}").json()
            if body["complete"]:
                items += len(body["items"])
                break
            assert time.monotonic() < deadline, f"request {rid} never completed: {body}"
            time.sleep(0.3)
    return items


def test_stalled_inference_gives_429_with_bounded_memory(
    make_stack: Callable[..., Stack], images: ImageServer, record: Callable[..., None]
) -> None:
    stack = make_stack(
        max_msgs=STREAM_MAX_MSGS,
        gateway_env={
            "TAGPIPE_REALTIME_BACKLOG_LIMIT": "150",
            "TAGPIPE_BULK_BACKLOG_LIMIT": "100",
            "TAGPIPE_BACKLOG_CACHE_S": "0.2",
            "TAGPIPE_REALTIME_TIMEOUT_S": "4",
            "TAGPIPE_REALTIME_DEFAULT_TIMEOUT_S": "4",
        },
    )
    inference = [s for s in stack.services if s.name.startswith("inference")]
    baseline = process_rss(stack)
    load = RealtimeLoad(stack.gateway_url, images)
    samples: list[dict[str, int]] = []
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
        for svc in inference:
            svc.signal(signal.SIGSTOP)
        try:
            job_id = submit_job(http, image_urls(images, N, "stall"))
            load.start()
            first_429: float | None = None
            at_first_429: dict[str, int] = {}
            deadline = time.monotonic() + 90
            while first_429 is None or time.monotonic() - first_429 < PRESSURE_S:
                assert time.monotonic() < deadline, f"no 429 under a stalled tier: {load.statuses}"
                time.sleep(1)
                samples.append(process_rss(stack))
                if first_429 is None and load.statuses[429]:
                    first_429, at_first_429 = time.monotonic(), samples[-1]
            load.finish()
        finally:
            load.stop.set()
            for svc in inference:
                svc.signal(signal.SIGCONT)
        acc = account(stack, http, job_id, N)
        rt_items = wait_pending_results(http, load.timed_out)
    after = process_rss(stack)
    peak = {name: max(s.get(name, 0) for s in samples) for name in baseline}
    assert load.statuses[429] > 0 and not load.bad_429, load.bad_429[:3]
    assert set(load.statuses) <= {200, 429, 504}, load.statuses  # never a 5xx but the timeout
    for name, kb in peak.items():
        assert kb - at_first_429[name] < MAX_GROWTH_KB, (name, at_first_429[name], kb)
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes
    record(
        acc,
        duplicates_absorbed=redelivered_duplicates(stack),
        realtime_statuses={str(k): v for k, v in sorted(load.statuses.items())},
        realtime_items_timed_out_then_resulted=rt_items,
        rss_kb={"baseline": baseline, "at_first_429": at_first_429, "peak": peak, "after": after},
    )


def test_a_stall_longer_than_every_delivery_strands_nothing(
    make_stack: Callable[..., Stack], images: ImageServer, record: Callable[..., None]
) -> None:
    """Downloaders that cannot publish (inference stream full) for longer than
    max_deliver x their retry budget: JetStream will not deliver an item again
    after its last delivery, so giving it back then would strand it unseen."""
    stack = make_stack(
        max_msgs=100,
        max_deliver=3,
        downloader_env={"TAGPIPE_INFRA_RETRY_BUDGET_S": "1"},
        gateway_env={"TAGPIPE_BULK_BACKLOG_LIMIT": "100", "TAGPIPE_BACKLOG_CACHE_S": "0.2"},
    )
    n = 400
    inference = [s for s in stack.services if s.name.startswith("inference")]
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
        for svc in inference:
            svc.signal(signal.SIGSTOP)
        try:
            job_id = submit_job(http, image_urls(images, n, "strand"))
            # Three deliveries of ~1 s budget plus NAK delays and ack waits, several times over.
            time.sleep(25)
        finally:
            for svc in inference:
                svc.signal(signal.SIGCONT)
        acc = account(stack, http, job_id, n)
    assert_exactly_once(acc)
    assert acc.status["done"] == n, acc.codes
    record(acc, duplicates_absorbed=redelivered_duplicates(stack), stall_s=25)
