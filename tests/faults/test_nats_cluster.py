"""kill -9 of JetStream cluster servers in the middle of a bulk job, R3 streams.

The stack runs on three clustered nats-server processes (`NatsCluster`), every
tagpipe stream at 3 replicas, and every service holding the full server list. A
bulk job of 3,000 items runs with real-time calls alongside, and:

1. a server that leads neither stream is killed (kill -9): its clients reconnect
   to the other two, the streams keep their leaders. It comes back on the same
   port and store and catches up before the next fault;
2. the download stream's leader is killed: the two left elect a new leader (a
   quorum of 2 of 3), the clients reconnect, unacked items are redelivered.

Each fault records how long the job stood still (the longest time without a
finished item around it) and how many deliveries JetStream repeated, read from
its own counters; every item must end as exactly one result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from tagpipe_cli.nats_cluster import NatsCluster
from tagpipe_cli.servers import ServerProcess
from tagpipe_cli.stack import Stack
from tagpipe_common.streams import StreamPolicy
from tagpipe_common.subjects import Stage, stage_names

from bench.imageserver import ImageServer
from tests.faults.kit import (
    MAX_DELIVER,
    Progress,
    RealtimeLoad,
    account,
    assert_exactly_once,
    deliveries,
    image_urls,
    job_status,
    redelivered_duplicates,
    submit_job,
    wait_finished,
)

# Two kills, each followed by its redelivery window, on R3 streams (~30 img/s here).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

# Enough that the second kill still lands mid-job: in a CI run with N = 2,000 and the
# leader's kill at 1,000 finished, the job had ended during the first kill's window.
N = 3000
# Longer than the other fault tests' 4-6 s: on two busy cores a batch can sit in an
# inference worker for seconds, and redeliveries of that kind would drown the ones
# a server kill causes. Every worker here lives, so no item waits on the ack wait.
ACK_WAIT_S = 10.0
POLICY = StreamPolicy(
    ack_wait_s=ACK_WAIT_S,
    max_deliver=MAX_DELIVER,
    ack_wait_overrides={Stage.DOWNLOAD: ACK_WAIT_S},
)
DOWNLOAD = stage_names(Stage.DOWNLOAD).stream
INFER = stage_names(Stage.INFER).stream


def leaders(cluster: NatsCluster) -> set[str]:
    return {cluster.name_of(cluster.stream_leader(s)) for s in (DOWNLOAD, INFER)}


def led_without(cluster: NatsCluster, victim: ServerProcess, timeout_s: float = 60) -> float:
    """Seconds until both streams answer with a leader other than `victim` (an
    election, when it led one): JetStream's own unavailability for the fault."""
    t0 = time.monotonic()
    for stream in (DOWNLOAD, INFER):
        while cluster.stream_leader(stream, timeout_s) is victim:
            assert time.monotonic() - t0 < timeout_s, f"{stream}: no new leader"
            time.sleep(0.1)
    return round(time.monotonic() - t0, 2)


def test_kill_9_of_a_follower_then_of_the_stream_leader(
    make_stack: Callable[..., Stack], images: ImageServer, record: Callable[..., None]
) -> None:
    stack = make_stack(nats_servers=3, policy=POLICY, env={"TAGPIPE_ACK_WAIT_S": str(ACK_WAIT_S)})
    cluster = stack.nats_cluster
    assert cluster is not None and stack.stream_replicas == 3
    faults: dict[str, dict[str, Any]] = {}

    def fault(name: str, victim: ServerProcess, at_least: int, http: httpx.Client) -> None:
        wait_finished(http, job_id, at_least, timeout_s=300)
        at_kill = job_status(http, job_id)["finished"]
        assert at_kill < N, f"the job ended before {name}: raise N"
        before, t0 = deliveries(stack), time.monotonic()
        victim_name = cluster.name_of(victim)
        led_by_victim = sorted(s for s in (DOWNLOAD, INFER) if cluster.stream_leader(s) is victim)
        victim.kill()  # SIGKILL: no flush, no goodbye to its routes or clients
        election_s = led_without(cluster, victim)
        new_leader = cluster.stream_leader(DOWNLOAD)
        wait_finished(http, job_id, min(N, job_status(http, job_id)["finished"] + 50), 300)
        victim.start()  # same port and store: it rejoins and catches up
        for stream in (DOWNLOAD, INFER):
            cluster.wait_current(stream)
        # Past the longest ack wait, so what the kill left unacked has been redelivered.
        time.sleep(max(0.0, t0 + 1.5 * ACK_WAIT_S - time.monotonic()))
        t1 = time.monotonic()
        faults[name] = {
            "killed": victim_name,
            "streams_it_led": led_by_victim,
            "download_leader_after": cluster.name_of(new_leader),
            "finished_at_kill": at_kill,
            "streams_led_again_after_s": election_s,
            "stall_s": progress.stall_s(t0, t1),
            "window_s": round(t1 - t0, 1),
            "redeliveries": deliveries(stack) - before,
        }

    with (
        httpx.Client(base_url=stack.gateway_url, timeout=30) as http,
        RealtimeLoad(stack.gateway_url, images.url("/corpus/64x64/1.jpg")) as realtime,
    ):
        job_id = submit_job(http, image_urls(images, N, "nats-cluster"))
        with Progress(stack.gateway_url, job_id) as progress:
            wait_finished(http, job_id, 100, timeout_s=300)
            quiet_t0, quiet_before = time.monotonic(), deliveries(stack)
            wait_finished(http, job_id, 300, timeout_s=300)
            quiet = {
                "stall_s": progress.stall_s(quiet_t0, time.monotonic()),
                "window_s": round(time.monotonic() - quiet_t0, 1),
                "redeliveries": deliveries(stack) - quiet_before,
            }

            followers = [s for s in cluster.servers if cluster.name_of(s) not in leaders(cluster)]
            assert followers, "one server leads both streams' peers: no follower to kill"
            fault("kill_9_follower", followers[0], 300, http)
            leader = cluster.stream_leader(DOWNLOAD)
            fault("kill_9_stream_leader", leader, 0, http)  # at once, while most is left
            assert faults["kill_9_stream_leader"]["download_leader_after"] != cluster.name_of(
                leader
            ), "no new leader was elected"

            acc = account(stack, http, job_id, N)
        ready = http.get("/readyz/dependencies")
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes
    assert ready.status_code == 200, ready.text
    assert not stack.crashed(), [s.name for s in stack.crashed()]
    assert realtime.answers, "the real-time load never got an answer"
    assert realtime.bad == [], realtime.bad  # only 200, or 503/429 problem+json, Retry-After
    record(
        acc,
        nats_servers=3,
        stream_replicas=3,
        faults=faults,
        without_fault=quiet,  # the same figures over a window with no kill, for scale
        redeliveries_total=deliveries(stack),
        duplicates_absorbed=redelivered_duplicates(stack),
        realtime_statuses=realtime.counts(),
    )
