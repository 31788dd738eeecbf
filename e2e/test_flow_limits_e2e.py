"""Flow-control limits that follow the deployment, on a real API server and NATS
(issue 28 item 1): the operator sizes each consumer from the stage's maximum
replicas x slots, grows it when the maximum grows (replacing the consumer where
max_waiting cannot change in place), and refuses a stage env that sets a
setting streams and workers must agree on, with a condition that says so. Maxima
that one consumer cannot hold are refused with the partitions they need, and
accepted once spec.nats.partitions gives them (issue 28 item 3)."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any

from e2e_helpers import TP_PATH, OperatorProcess, conditions, eventually, tagpipeline
from nats.aio.client import Client
from tagpipe_common.subjects import Lane, Stage, partition_names, stage_names

from tests.kube_rest import KubeClient


async def consumer_limits(nc: Client, prefix: str) -> tuple[int, int] | None:
    names = stage_names(Stage.DOWNLOAD, prefix)
    try:
        info = await nc.jetstream().consumer_info(names.stream, names.consumer(Lane.BULK))
    except Exception:
        return None
    return int(info.config.max_ack_pending or 0), int(info.config.max_waiting or 0)


async def limits_are(nc: Client, prefix: str, want: tuple[int, int]) -> bool:
    return await consumer_limits(nc, prefix) == want


async def test_consumer_limits_follow_the_replica_maximum(
    kube: KubeClient, namespace: str, operator: OperatorProcess, nats_url: str, nc: Client
) -> None:
    name, prefix = "flow", f"flow{uuid.uuid4().hex[:6]}"
    body = tagpipeline(name, nats_url, prefix, {"replicas": {"min": 1, "max": 400}})
    await kube.request("POST", TP_PATH.format(ns=namespace), body)
    # 1.25 x 400 replicas x 32 slots: no fixed 1,000 / 512 cap on the tier.
    await eventually(partial(limits_are, nc, prefix, (16_000, 16_000)))
    config = await kube.get("ConfigMap", namespace, f"{name}-config")
    assert config is not None
    assert config["data"]["TAGPIPE_MAX_DELIVER"] == "5"
    assert config["data"]["TAGPIPE_ACK_WAIT_S"] == "30"
    patch = {"spec": {"downloader": {"replicas": {"min": 1, "max": 800}}}}
    await kube.request(
        "PATCH",
        f"{TP_PATH.format(ns=namespace)}/{name}",
        patch,
        content_type="application/merge-patch+json",
    )
    # max_waiting cannot change in place: the consumer was replaced, and grew.
    await eventually(partial(limits_are, nc, prefix, (32_000, 32_000)))


async def refused_for(kube: KubeClient, ns: str, name: str) -> dict[str, Any] | None:
    tp = await kube.get("TagPipeline", ns, name)
    for c in conditions(tp):
        if c["type"] == "Ready" and c["status"] == "False" and c["reason"] == "FlowLimits":
            return c
    return None


async def test_a_stage_env_setting_an_agreed_value_is_refused_with_a_condition(
    kube: KubeClient, namespace: str, operator: OperatorProcess, nats_url: str
) -> None:
    name, prefix = "override", f"ovr{uuid.uuid4().hex[:6]}"
    env = [{"name": "TAGPIPE_MAX_DELIVER", "value": "9"}]
    body = tagpipeline(name, nats_url, prefix, {"env": env})
    await kube.request("POST", TP_PATH.format(ns=namespace), body)
    cond = await eventually(partial(refused_for, kube, namespace, name))
    assert "downloader.env sets TAGPIPE_MAX_DELIVER" in cond["message"], cond
    # Refused whole: no child was rendered with a value the consumers do not have.
    assert await kube.get("Deployment", namespace, f"{name}-downloader") is None


async def partition_limits(nc: Client, prefix: str, parts: int) -> list[int] | None:
    out = []
    for names in partition_names(Stage.DOWNLOAD, prefix, parts):
        try:
            info = await nc.jetstream().consumer_info(names.stream, names.consumer(Lane.BULK))
        except Exception:
            return None
        out.append(int(info.config.max_ack_pending or 0))
    return out


async def test_maxima_past_one_consumer_need_partitions_and_get_them(
    kube: KubeClient, namespace: str, operator: OperatorProcess, nats_url: str, nc: Client
) -> None:
    # 1.25 x 1,000 replicas x 128 slots = 160,000 in flight: 2 consumers of 100,000.
    name, prefix = "parts", f"parts{uuid.uuid4().hex[:6]}"
    stage = {"replicas": {"min": 1, "max": 1000}, "limits": {"concurrency": 128}}
    await kube.request(
        "POST", TP_PATH.format(ns=namespace), tagpipeline(name, nats_url, prefix, stage)
    )
    cond = await eventually(partial(refused_for, kube, namespace, name))
    assert "need 2 partitions" in cond["message"] and "spec.nats.partitions is 1" in cond["message"]
    patch = {"spec": {"nats": {"partitions": 2}}}
    await kube.request(
        "PATCH",
        f"{TP_PATH.format(ns=namespace)}/{name}",
        patch,
        content_type="application/merge-patch+json",
    )
    # Each partition's consumer holds its share: ceil(160,000 / 2) x 1.2 = 96,000.
    want = [96_000, 96_000]
    await eventually(partial(partition_limits_are, nc, prefix, want))
    config = await kube.get("ConfigMap", namespace, f"{name}-config")
    assert config is not None and config["data"]["TAGPIPE_PARTITIONS"] == "2"


async def partition_limits_are(nc: Client, prefix: str, want: list[int]) -> bool:
    return await partition_limits(nc, prefix, len(want)) == want
