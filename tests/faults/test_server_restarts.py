"""NATS restarted and Redis taken away in the middle of a bulk job.

NATS keeps its file store and port, so queued items survive and every client
reconnects by itself. While Redis is away the gateway says so (503 problem+json
on the calls that need it, and on /readyz/dependencies, while /readyz stays 200 so
that no gateway leaves the Service over an outage they all share), the workers
hold what they could not store instead of acking it, and the job completes once
Redis is back.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import httpx
import pytest
from tagpipe_cli.servers import ServerProcess
from tagpipe_cli.stack import Stack

from bench.imageserver import ImageServer
from tests.faults.kit import (
    RealtimeLoad,
    account,
    assert_exactly_once,
    image_urls,
    job_status,
    outage_warnings,
    redelivered_duplicates,
    submit_job,
    wait_finished,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 800


def test_nats_restarts_at_every_moment_of_a_job(
    make_stack: Callable[..., Stack], images: ImageServer, record: Callable[..., None]
) -> None:
    """NATS goes away four times in one bulk job, with real-time calls alongside:

    1. before the first fetch: down when the job is submitted (the intake only
       needs Redis; the submitter waits JetStream out, holding its lease);
    2. as the first batch's results are written and its acks sent;
    3. mid-batch, a third of the way through;
    4. while results are written: Redis is frozen (SIGSTOP) so every worker is
       stuck storing a batch, and NATS restarts under them.

    Each time JetStream comes back on the same port and file store, and for a
    moment answers "service unavailable" before its streams are recovered. No
    process may exit over it, and every item ends as exactly one result.
    """
    stack = make_stack()
    assert stack.nats is not None and stack.redis is not None
    nats_srv, redis_srv = stack.nats, stack.redis
    moments: list[str] = []
    with (
        httpx.Client(base_url=stack.gateway_url, timeout=30) as http,
        RealtimeLoad(stack.gateway_url, images.url("/corpus/64x64/1.jpg")) as realtime,
    ):
        nats_srv.stop()  # SIGTERM: nats-server flushes its file store
        job_id = submit_job(http, image_urls(images, N, "nats"))
        _restart_after(nats_srv, 2.0)
        moments.append("before_first_fetch")

        wait_finished(http, job_id, 1)
        _restart_after(nats_srv, 2.0)
        moments.append("first_results_and_acks")

        wait_finished(http, job_id, N // 3)
        _restart_after(nats_srv, 2.0)
        moments.append("mid_batch")

        wait_finished(http, job_id, 2 * N // 3)
        before = job_status(http, job_id)["finished"]
        assert redis_srv.proc is not None
        redis_srv.proc.send_signal(signal.SIGSTOP)  # workers block writing results
        try:
            time.sleep(1.0)
            _restart_after(nats_srv, 2.0)
        finally:
            redis_srv.proc.send_signal(signal.SIGCONT)
        moments.append("while_results_are_written")

        acc = account(stack, http, job_id, N)
        ready = http.get("/readyz/dependencies")
    assert before < N, "the job ended before the last restart: nothing was in flight"
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes
    assert ready.status_code == 200, ready.text  # the gateway reconnected by itself
    assert not stack.crashed(), [s.name for s in stack.crashed()]  # no service exited over it
    assert realtime.answers, "the real-time load never got an answer"
    assert realtime.bad == [], realtime.bad  # only 200, or 503/429 problem+json
    record(
        acc,
        duplicates_absorbed=redelivered_duplicates(stack),
        restarts=moments,
        realtime_statuses=realtime.counts(),
        outage_warnings=outage_warnings(stack),
    )


def _restart_after(srv: ServerProcess, down_s: float) -> None:
    port, store = srv.port, srv.data_dir
    srv.stop()
    time.sleep(down_s)  # every client notices and starts reconnecting
    srv.start()
    assert (srv.port, srv.data_dir) == (port, store)


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
            deps = http.get("/readyz/dependencies")
            status = http.get(f"/v1/jobs/{job_id}")
            realtime = http.post("/v1/tags", json={"url": images.url("/corpus/64x64/1.jpg")})
            time.sleep(4)  # workers meet the outage with results in hand
        finally:
            stack.redis.start()
        acc = account(stack, http, job_id, N)
    assert ready.status_code == 200, ready.text  # stays in the Service, answers 503 below
    assert deps.status_code == 503 and deps.json()["checks"]["redis"].startswith("error")
    for r in (status, realtime):
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "redis_unavailable"
    assert before < N
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes
    assert not stack.crashed(), [s.name for s in stack.crashed()]
    record(
        acc,
        duplicates_absorbed=redelivered_duplicates(stack),
        finished_at_outage=before,
        readyz_during_outage=ready.status_code,
        dependencies_during_outage=deps.status_code,
    )
