"""NATS restarted and Redis taken away in the middle of a bulk job.

NATS keeps its file store and port, so queued items survive and every client
reconnects by itself. While Redis is away the gateway says so (503 problem+json
on the calls that need it, 503 on /readyz), the workers hold what they could not
store instead of acking it, and the job completes once Redis is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
from tagpipe_cli.stack import Stack

from bench.imageserver import ImageServer
from tests.faults.kit import (
    account,
    assert_exactly_once,
    image_urls,
    job_status,
    redelivered_duplicates,
    submit_job,
    wait_finished,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 800


def test_nats_restart_mid_job(
    make_stack: Callable[..., Stack], images: ImageServer, record: Callable[..., None]
) -> None:
    stack = make_stack()
    assert stack.nats is not None
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
        job_id = submit_job(http, image_urls(images, N, "nats"))
        wait_finished(http, job_id, N // 5)
        before = job_status(http, job_id)["finished"]
        port, store = stack.nats.port, stack.nats.data_dir
        stack.nats.stop()  # SIGTERM: nats-server flushes its file store
        time.sleep(2)  # long enough for every client to notice and start reconnecting
        stack.nats.start()
        assert (stack.nats.port, stack.nats.data_dir) == (port, store)
        acc = account(stack, http, job_id, N)
        ready = http.get("/readyz")
    assert before < N
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes
    assert ready.status_code == 200, ready.text  # the gateway reconnected by itself
    assert not stack.dead(), [s.name for s in stack.dead()]  # no service crashed over it
    record(acc, duplicates_absorbed=redelivered_duplicates(stack), finished_at_restart=before)


def test_redis_outage_mid_job(
    make_stack: Callable[..., Stack], images: ImageServer, record: Callable[..., None]
) -> None:
    stack = make_stack()
    assert stack.redis is not None
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
        job_id = submit_job(http, image_urls(images, N, "redis"))
        wait_finished(http, job_id, N // 5)
        before = job_status(http, job_id)["finished"]
        stack.redis.stop()
        try:
            ready = http.get("/readyz")
            status = http.get(f"/v1/jobs/{job_id}")
            realtime = http.post("/v1/tags", json={"url": images.url("/corpus/64x64/1.jpg")})
            time.sleep(4)  # workers meet the outage with results in hand
        finally:
            stack.redis.start()
        acc = account(stack, http, job_id, N)
    assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("error")
    for r in (status, realtime):
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "redis_unavailable"
    assert before < N
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes
    assert not stack.dead(), [s.name for s in stack.dead()]
    record(
        acc,
        duplicates_absorbed=redelivered_duplicates(stack),
        finished_at_outage=before,
        readyz_during_outage=ready.status_code,
    )
