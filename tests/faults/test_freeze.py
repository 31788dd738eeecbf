"""SIGSTOP, not kill -9: the Redis primary, then the download stream's NATS leader, frozen
mid-job on the `tagpipe up --ha` stack (issue 28).

A killed server resets its connections and every client notices at once. A frozen
one (a paused VM, a partition) sends nothing at all: its kernel still accepts
connections and bytes, and a client without a bound waits on it for minutes. Here
both stay frozen while the job finishes, so the pipeline must notice by itself:

- Redis: every command has a socket timeout (redis_io.RedisTimeouts), so a worker's
  write to the frozen primary fails within seconds and is retried; the sentinels
  promote a replica and the Sentinel client finds it. Results were WAITed for a
  replica before their messages were acked, so nothing acked is lost;
- NATS: clients PING their server every few seconds (nats_io.NatsLiveness) and leave
  one that stops answering for another; the other two servers elect new leaders.

The job must end with every item exactly once while both stay frozen; after SIGCONT
the old primary must come back as a replica and the NATS server as a current peer.
Real-time requests run throughout: every one must be answered (200, 429, 503 or
504), and how long they took is recorded, not asserted (a busy box is slower).
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from tagpipe_cli.stack import Stack
from tagpipe_common.nats_io import NatsLiveness
from tagpipe_common.redis_io import RedisTimeouts
from tagpipe_common.streams import StreamPolicy
from tagpipe_common.subjects import Stage, stage_names

from bench.imageserver import ImageServer
from tests.faults.kit import (
    MAX_DELIVER,
    Progress,
    account,
    assert_exactly_once,
    deliveries,
    image_urls,
    job_status,
    redelivered_duplicates,
    submit_job,
    wait_finished,
)
from tests.tools import frozen

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

N = 1500
# As test_nats_cluster: on two busy cores a batch can sit in a worker for seconds,
# and redeliveries of that kind would drown the ones a freeze causes.
ACK_WAIT_S = 10.0
POLICY = StreamPolicy(
    ack_wait_s=ACK_WAIT_S, max_deliver=MAX_DELIVER, ack_wait_overrides={Stage.DOWNLOAD: ACK_WAIT_S}
)
DOWNLOAD = stage_names(Stage.DOWNLOAD).stream
INFER = stage_names(Stage.INFER).stream
# Past a freeze the job must move again within this (it does in seconds): without
# the timeouts a frozen peer holds a worker for minutes (NATS: 2 x 120 s of PINGs)
# or for good (a Redis read with no socket timeout).
MOVES_AGAIN_WITHIN_S = 150.0
MOVE = 200  # items finished past a freeze that show the pipeline moved on
# What a service logs when it finds a peer gone (outage.py, nats_io.connect_nats): every
# word of one of these in a line.
REDIS_NOTICED = ("redis", "unavailable, retrying with backoff")
NATS_NOTICED = ("nats disconnected",)


class TimedLoad:
    """Real-time calls (the gateway's default deadline) in a thread alongside the
    freezes: each must be answered, and every answer's time is kept."""

    OK = {200, 429, 503, 504}

    def __init__(self, gateway_url: str, image_url: str, every_s: float = 0.25) -> None:
        self.gateway_url, self.image_url, self.every_s = gateway_url, image_url, every_s
        self.answers: list[tuple[float, int, float]] = []  # (sent at, status, seconds)
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timed-load", daemon=True)

    def __enter__(self) -> TimedLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        with httpx.Client(base_url=self.gateway_url, timeout=120) as http:
            while not self._stop.wait(self.every_s):
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/tags", json={"url": self.image_url})
                except httpx.TransportError as exc:
                    self.bad.append(f"no answer after {time.monotonic() - t0:.1f} s: {exc!r}")
                    continue
                self.answers.append((t0, r.status_code, time.monotonic() - t0))
                if r.status_code not in self.OK:
                    self.bad.append(f"{r.status_code} {r.text[:200]}")

    def summary(self, start: float, end: float) -> dict[str, Any]:
        """Statuses and answer times of the calls in flight at any time in [start, end]."""
        rows = [(s, d) for t, s, d in self.answers if t <= end and t + d >= start]
        times = [d for _, d in rows]
        statuses = [s for s, _ in rows]
        return {
            "requests": len(rows),
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "p50_s": round(float(np.percentile(times, 50)), 3) if times else None,
            "p99_s": round(float(np.percentile(times, 99)), 3) if times else None,
            "max_s": round(max(times), 3) if times else None,
        }


def role_of(port: int) -> tuple[str, str]:
    """(role, master_link_status) of one Redis node; ('', '') while it does not answer."""
    try:
        with redis.Redis(port=port, socket_timeout=1) as r:
            info = r.info("replication")
    except (redis.RedisError, OSError):
        return "", ""
    return str(info["role"]), str(info.get("master_link_status", ""))


def rejoined_as_replica(port: int, timeout_s: float = 90) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if role_of(port) == ("slave", "up"):
            return True
        time.sleep(0.5)
    return False


def noticed(stack: Stack, since: float, until: float, needles: tuple[str, ...]) -> dict[str, float]:
    """Per service, seconds from `since` (epoch) to its first log line before `until`
    saying it lost the peer. A service whose client retried past the freeze on its own,
    or that was not connected to the frozen server, says nothing."""
    out = {}
    for svc in stack.services:
        lines = (
            svc.log_path.read_text(errors="replace").splitlines() if svc.log_path.exists() else []
        )
        for line in lines:
            if not all(n in line for n in needles):
                continue
            try:
                ts = json.loads(line)["ts"]
            except (ValueError, KeyError, TypeError):
                continue
            at = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            if since <= at < until:
                out[svc.name] = round(at - since, 1)
                break
    return out


def moved_on(http: httpx.Client, job_id: str, t0: float, progress: Progress) -> dict[str, Any]:
    """Wait until MOVE more items finished (or the job ended) and say how long the job
    stood still around the freeze at `t0`."""
    at = job_status(http, job_id)["finished"]
    wait_finished(http, job_id, min(N, at + MOVE), timeout_s=MOVES_AGAIN_WITHIN_S)
    return {
        "finished_at_freeze": at,
        "stall_s": progress.stall_s(t0, time.monotonic()),
        "moved_again_after_s": round(time.monotonic() - t0, 1),
    }


def test_freeze_the_redis_primary_then_the_nats_stream_leader(
    make_stack: Callable[..., Stack], images: ImageServer, record: Callable[..., None]
) -> None:
    stack = make_stack(
        nats_servers=3,
        redis_sentinel=True,
        policy=POLICY,
        env={"TAGPIPE_ACK_WAIT_S": str(ACK_WAIT_S)},
        # The gateway's default deadline, as shipped: real-time calls carry none.
        gateway_env={"TAGPIPE_REALTIME_DEFAULT_TIMEOUT_S": "2"},
    )
    ha, cluster = stack.redis_set, stack.nats_cluster
    assert ha is not None and cluster is not None
    faults: dict[str, dict[str, Any]] = {}
    with (
        httpx.Client(base_url=stack.gateway_url, timeout=60) as http,
        TimedLoad(stack.gateway_url, images.url("/corpus/64x64/1.jpg")) as load,
    ):
        job_id = submit_job(http, image_urls(images, N, "freeze"))
        with Progress(stack.gateway_url, job_id) as progress:
            wait_finished(http, job_id, 200, timeout_s=300)
            before = deliveries(stack)
            old_primary = ha.primary()
            with frozen(old_primary.proc):
                t0, wall0 = time.monotonic(), time.time()
                new_primary = ha.wait_failover(old_primary)
                faults["redis_primary"] = {
                    "sentinel_failover_s": round(time.monotonic() - t0, 1),
                    **moved_on(http, job_id, t0, progress),
                }
                leader = cluster.stream_leader(DOWNLOAD)
                led = sorted(s for s in (DOWNLOAD, INFER) if cluster.stream_leader(s) is leader)
                with frozen(leader.proc):
                    t1, wall1 = time.monotonic(), time.time()
                    faults["nats_stream_leader"] = {
                        "froze": cluster.name_of(leader),
                        "streams_it_led": led,
                        **moved_on(http, job_id, t1, progress),
                    }
                    at_end = job_status(http, job_id)["finished"]
                    acc = account(stack, http, job_id, N)  # both still frozen
                    frozen_until, wall2 = time.monotonic(), time.time()
            faults["redis_primary"]["noticed_after_s"] = noticed(stack, wall0, wall1, REDIS_NOTICED)
            faults["nats_stream_leader"]["noticed_after_s"] = noticed(
                stack, wall1, wall2, NATS_NOTICED
            )
            # Both thawed: they must rejoin as a replica and as a current peer.
            old_is_replica = rejoined_as_replica(old_primary.port)
            for stream in (DOWNLOAD, INFER):
                cluster.wait_current(stream)
            ready = http.get("/readyz/dependencies")
        redelivered = deliveries(stack) - before
    assert faults["redis_primary"]["finished_at_freeze"] < N, "the job ended before the freeze"
    assert at_end < N, "the job ended before the NATS freeze"
    assert new_primary is not old_primary
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes
    assert old_is_replica, f"the thawed primary is {role_of(old_primary.port)}, not a replica"
    assert ready.status_code == 200, ready.text
    assert not stack.crashed(), [s.name for s in stack.crashed()]
    assert load.answers, "the real-time load never got an answer"
    assert load.bad == [], load.bad  # every call answered: 200, 429, 503 or 504
    record(
        acc,
        fault="SIGSTOP of the Redis primary, then of the download stream's NATS leader, "
        "both left frozen until the job ended (tagpipe up --ha)",
        detection_bounds={
            "redis_socket_timeout_s": RedisTimeouts.socket_timeout_s,
            "nats_frozen_server_noticed_within_s": NatsLiveness().detect_s,
        },
        faults=faults,
        redeliveries=redelivered,
        duplicates_absorbed=redelivered_duplicates(stack),
        realtime_while_frozen=load.summary(t0, frozen_until),
        realtime_all=load.summary(0.0, time.monotonic()),
    )
