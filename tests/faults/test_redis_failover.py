"""kill -9 of the Redis primary in the middle of a bulk job, on a Sentinel set.

The stack's Redis is the failover set a deployment runs (redis_ha.RedisSentinelSet:
one primary, two replicas, three sentinels), reached by every service through the
redis+sentinel:// URL. Results are written with a WAIT for one replica before their
messages are acked, so the promoted replica holds every result whose message is
gone; anything the dead primary had not passed on is still unacked in JetStream and
is redelivered. The job must complete with every item exactly once, and the
real-time API must answer only 200 or 503/429 problem+json with Retry-After.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest
import redis
from tagpipe_cli.stack import Stack

from bench.imageserver import ImageServer
from tests.faults.kit import (
    Progress,
    RealtimeLoad,
    account,
    assert_exactly_once,
    deliveries,
    image_urls,
    job_status,
    missing_items,
    redelivered_duplicates,
    submit_job,
    wait_finished,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 2000


def test_redis_primary_killed_mid_job(
    make_stack: Callable[..., Stack], images: ImageServer, record: Callable[..., None]
) -> None:
    stack = make_stack(redis_sentinel=True)
    ha = stack.redis_set
    assert ha is not None
    with (
        httpx.Client(base_url=stack.gateway_url, timeout=30) as http,
        RealtimeLoad(stack.gateway_url, images.url("/corpus/64x64/1.jpg")) as realtime,
    ):
        job_id = submit_job(http, image_urls(images, N, "redis-failover"))
        with Progress(stack.gateway_url, job_id) as progress:
            wait_finished(http, job_id, N // 4, timeout_s=300)
            redelivered = deliveries(stack)
            before = job_status(http, job_id)["finished"]
            killed_at = time.monotonic()
            old = ha.kill_primary()
            new = ha.wait_failover(old)
            failover_s = time.monotonic() - killed_at
            wait_finished(http, job_id, N // 2, timeout_s=300)  # well past the failover
            stall_s = progress.stall_s(killed_at, killed_at + failover_s)
            old.start()  # the old primary comes back: the sentinels make it a replica
            acc = account(stack, http, job_id, N)
        redelivered = deliveries(stack) - redelivered
        lines = _read_results(http, job_id)
        rejoined = _role_eventually(old.port, "slave")
    assert before < N, "the job ended before the kill: nothing was in flight"
    assert new.port != old.port
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes
    assert missing_items(stack, job_id, N) == []  # every result key, on the new primary
    assert len(lines) == N and len({x["item_id"] for x in lines}) == N  # and through the API
    assert not stack.crashed(), [s.name for s in stack.crashed()]  # no service exited over it
    assert realtime.answers, "the real-time load never got an answer"
    assert realtime.bad == [], realtime.bad  # only 200, or 503/429 problem+json
    assert rejoined, "the killed primary did not rejoin as a replica"
    record(
        acc,
        fault="kill -9 of the Redis primary (Sentinel: 1 primary, 2 replicas, 3 sentinels)",
        finished_at_kill=before,
        failover_s=round(failover_s, 2),
        stall_s=stall_s,
        redeliveries=redelivered,
        duplicates_absorbed=redelivered_duplicates(stack),
        realtime_statuses=realtime.counts(),
    )


def _read_results(http: httpx.Client, job_id: str) -> list[dict[str, object]]:
    with http.stream("GET", f"/v1/jobs/{job_id}/results") as r:
        assert r.status_code == 200
        return [json.loads(line) for line in r.iter_lines() if line.strip()]


def _role_eventually(port: int, role: str, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with redis.Redis(port=port, socket_timeout=1) as r:
                if r.info("replication")["role"] == role:
                    return True
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.5)
    return False
