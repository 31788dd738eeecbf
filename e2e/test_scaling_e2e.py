"""The rate term and a percent scale policy on a real API server (issue 19).

No pod runs here, so the test is the downloader: it pulls from the stage's
consumer, holds 80 messages in service and acks the oldest as new ones arrive,
while it keeps publishing. The operator measures those rates from JetStream's
counters, and with 2 slots per replica Little's law says one replica completes
1/40 of what arrives: far more replicas than 2 are wanted. The backlog rule
alone would not move (a target of 1000 per replica), so the only way up is the
rate term, and a scale-up policy of 400 % per minute (against 1 pod) takes the
Deployment from 2 to 10 in one decision, its Pods Pending all the while.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from functools import partial
from typing import Any

from e2e_helpers import TP_PATH, OperatorProcess, eventually, tagpipeline
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from tagpipe_common.subjects import Lane, Stage, stage_names

from tests.kube_rest import KubeClient

HELD = 80  # messages the stand-in worker keeps in service


def pipeline(name: str, nats_url: str, prefix: str) -> dict[str, Any]:
    downloader = {
        "replicas": {"min": 2, "max": 50},
        "limits": {"concurrency": 2},
        "autoscaling": {
            "targetBacklogPerReplica": 1000,
            "targetUtilization": 1.0,
            "rateWindowSeconds": 5,
            "scaleUpPolicies": [
                {"type": "Pods", "value": 1, "periodSeconds": 60},
                {"type": "Percent", "value": 400, "periodSeconds": 60},
            ],
            "scaleUpSelectPolicy": "Max",
        },
    }
    return tagpipeline(name, nats_url, prefix, downloader)


async def stand_in_worker(nc: Client, prefix: str, stop: asyncio.Event) -> None:
    """Publish 5 every quarter second, pull them, ack the oldest beyond HELD."""
    names = stage_names(Stage.DOWNLOAD, prefix)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(names.consumer(Lane.BULK), names.stream)
    held: deque[Msg] = deque()
    n = 0
    while not stop.is_set():
        for _ in range(5):
            await js.publish(names.subject(Lane.BULK), b"x", headers={"Nats-Msg-Id": f"r{n}"})
            n += 1
        with contextlib.suppress(NatsTimeout):
            held.extend(await sub.fetch(5, timeout=1))
        while len(held) > HELD:
            await held.popleft().ack()
        await asyncio.sleep(0.25)


async def scale_events(kube: KubeClient, ns: str, name: str) -> list[str]:
    listing = await kube.request("GET", f"/api/v1/namespaces/{ns}/events")
    return [
        e.get("message", "")
        for e in listing.get("items") or []
        if e.get("involvedObject", {}).get("name") == name
        and str(e.get("message", "")).startswith("downloader:")
    ]


async def replicas(kube: KubeClient, ns: str, deployment: str) -> int | None:
    dep = await kube.get("Deployment", ns, deployment)
    return None if dep is None else int(dep["spec"].get("replicas") or 0)


async def stream_exists(nc: Client, stream: str) -> bool:
    try:
        await nc.jetstream().stream_info(stream)
    except Exception:
        return False
    return True


async def test_a_measured_rate_scales_by_a_percent_policy_in_one_decision(
    kube: KubeClient, namespace: str, operator: OperatorProcess, nats_url: str, nc: Client
) -> None:
    name, prefix = "rate", f"rate{uuid.uuid4().hex[:6]}"
    await kube.request("POST", TP_PATH.format(ns=namespace), pipeline(name, nats_url, prefix))
    down = f"{name}-downloader"
    await eventually(partial(stream_exists, nc, stage_names(Stage.DOWNLOAD, prefix).stream))

    async def at(count: int) -> bool:
        return await replicas(kube, namespace, down) == count

    await eventually(partial(at, 2))
    stop = asyncio.Event()
    worker = asyncio.create_task(stand_in_worker(nc, prefix, stop))
    try:
        await eventually(partial(at, 10))
        events = await eventually(partial(scale_events, kube, namespace, name))
    finally:
        stop.set()
        await worker
    # One decision, 2 -> 10: 400 % of the 2 replicas at the period's start (Pending pods
    # count no further), chosen over the 1-pod policy; sized by the measured rates.
    assert len(events) == 1, events
    assert "replicas 2 -> 10" in events[0] and "arrivals" in events[0], events[0]
    assert "limited" in events[0], events[0]
