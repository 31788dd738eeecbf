"""The operator scales the gateway on the requests in flight the gateways report, on a
real API server and a real NATS.

No gateway pod runs here (no kubelet), so the test writes the reports a gateway writes
(tagpipe_gateway.load: a LoadReport under its own key in the pipeline's bucket) and reads
the gateway Deployment's replicas. The pipeline's backlog stays empty throughout: the
gateway must follow its own load, not the queue.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from e2e_helpers import OperatorProcess, eventually, run
from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from tagpipe_common.gatewayload import TTL_S, LoadReport, bucket_name
from tagpipe_common.nats_io import close_nats, connect_nats
from tagpipe_operator.render import child_name


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"tagpipe-e2e-gw-{uuid.uuid4().hex[:6]}"
    run("kubectl", "create", "namespace", name)
    yield name
    run("kubectl", "delete", "tagpipelines", "--all", "-n", name, "--wait=false", check=False)
    run("kubectl", "delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = await connect_nats([nats_url], "e2e-gateway-load")
    yield nc
    await close_nats(nc)


def replicas(ns: str, deployment: str) -> int | None:
    out = run("kubectl", "get", "deploy", deployment, "-n", ns, "--ignore-not-found", "-o", "json")
    return int(json.loads(out)["spec"]["replicas"]) if out.strip() else None


async def test_the_gateway_follows_its_requests_in_flight_not_the_backlog(
    ns: str,
    nats_url: str,
    client: Client,
    crd: object,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    name, prefix = "gw", f"gw{uuid.uuid4().hex[:6]}"
    fast = {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0}
    body = {
        "apiVersion": "tagpipe.io/v1alpha1",
        "kind": "TagPipeline",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
            "nats": {"url": nats_url, "prefix": prefix},
            "redis": {"url": "redis://redis:6379/0"},
            "inference": {"gpu": 0},
            "gateway": {
                "replicas": {"min": 2, "max": 4},
                "autoscaling": {"targetInFlightPerReplica": 50, **fast},
            },
            "deletionPolicy": "Retain",
        },
    }
    run("kubectl", "apply", "-f", "-", stdin=json.dumps(body))
    start_operator(ns)
    gateway = child_name(name, "gateway")
    # No gateway ready and no report: nothing is in flight, the floor holds.
    await eventually(lambda: replicas(ns, gateway) == 2, within=90)

    kv = await client.jetstream().create_key_value(
        KeyValueConfig(bucket=bucket_name(prefix), history=1, ttl=TTL_S)
    )

    async def report(in_flight: int) -> bool:
        """What two gateways put every 2 s; refreshed while the test waits."""
        for pod in ("gw-a-1", "gw-b-1"):
            await kv.put(pod, LoadReport(in_flight, time.time()).encode())
        return True

    # 2 x 90 = 180 in flight over 50 per replica: 4 (the max), with an empty backlog.
    await eventually(lambda: _after(report(90), lambda: replicas(ns, gateway) == 4), within=90)
    # The load goes (the gateways exit and delete their keys): back to the floor.
    for pod in ("gw-a-1", "gw-b-1"):
        await kv.delete(pod)
    await eventually(lambda: replicas(ns, gateway) == 2, within=90)


async def _after(step: object, check: Callable[[], bool]) -> bool:
    await step  # type: ignore[misc]
    return check()
