"""The operator against a real API server: validation, children, scaling, deletion."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
from e2e_helpers import eventually
from nats.aio.client import Client
from tagpipe_common.subjects import Lane, Stage, stage_names
from tagpipe_operator.kube import ApiError, KubeClient
from tagpipe_operator.settings import OperatorSettings

TP_PATH = "/apis/tagpipe.io/v1alpha1/namespaces/{ns}/tagpipelines"


def pipeline(name: str, nats_url: str, prefix: str) -> dict[str, Any]:
    fast = {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 5}
    return {
        "apiVersion": "tagpipe.io/v1alpha1",
        "kind": "TagPipeline",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
            "nats": {"url": nats_url, "prefix": prefix},
            "redis": {"url": "redis://redis:6379/0"},
            "inference": {
                "gpu": 0,
                "replicas": {"min": 1, "max": 4},
                "autoscaling": {
                    "targetBacklogPerReplica": 10,
                    "scaleUpPolicies": [{"type": "Pods", "value": 10, "periodSeconds": 1}],
                    **fast,
                },
            },
            "downloader": {"autoscaling": fast},
            "deletionPolicy": "Delete",
        },
    }


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("inference", "gpu"), -1, "gpu"),
        (("deletionPolicy",), "Keep", "deletionPolicy"),
        (("nats", "url"), "http://nats:4222", "url"),
    ],
)
async def test_invalid_tagpipeline_is_refused_by_the_api_server(
    kube: KubeClient, namespace: str, nats_url: str, path: tuple[str, ...], value: Any, field: str
) -> None:
    body = pipeline("bad", nats_url, "bad")
    node = body["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ApiError) as err:
        await kube.request("POST", TP_PATH.format(ns=namespace), body)
    assert err.value.status == 422
    assert field in str(err.value)


async def _replicas(kube: KubeClient, ns: str, name: str) -> int | None:
    dep = await kube.get("Deployment", ns, name)
    return None if dep is None else int(dep["spec"].get("replicas") or 0)


async def test_lifecycle_children_scaling_status_and_deletion(
    kube: KubeClient, namespace: str, operator: OperatorSettings, nats_url: str, nc: Client
) -> None:
    name, prefix = "e2e", f"e2e{uuid.uuid4().hex[:6]}"
    created = await kube.request(
        "POST", TP_PATH.format(ns=namespace), pipeline(name, nats_url, prefix)
    )
    uid = created["metadata"]["uid"]

    # Children appear, owned by the TagPipeline.
    for stage in ("gateway", "downloader", "inference"):
        dep = await eventually(partial(kube.get, "Deployment", namespace, f"{name}-{stage}"))
        assert dep["metadata"]["ownerReferences"][0]["uid"] == uid
    svc = await eventually(lambda: kube.get("Service", namespace, f"{name}-gateway"))
    assert svc["metadata"]["ownerReferences"][0]["uid"] == uid

    # A backlog of 35 on inference (10 per replica) scales it to 4; draining brings it back.
    js = nc.jetstream()
    infer = stage_names(Stage.INFER, prefix)
    await eventually(lambda: _stream_exists(js, infer.stream), within=30)
    for i in range(35):
        await js.publish(infer.subject(Lane.BULK), b"x", headers={"Nats-Msg-Id": f"e2e-{i}"})
    await eventually(lambda: _is(_replicas(kube, namespace, f"{name}-inference"), 4))
    await js.purge_stream(infer.stream)
    await eventually(lambda: _is(_replicas(kube, namespace, f"{name}-inference"), 1))

    # Status with conditions through the status subresource.
    tp = await kube.get("TagPipeline", namespace, name)
    assert tp is not None
    types = {c["type"] for c in tp["status"]["conditions"]}
    assert types == {"Ready", "Degraded", "ScalingLimited", "MetricsStale"}

    # A deleted child is recreated (drift correction).
    await kube.request("DELETE", f"/api/v1/namespaces/{namespace}/configmaps/{name}-config")
    await eventually(lambda: kube.get("ConfigMap", namespace, f"{name}-config"))

    # Delete: garbage collection removes the children; deletionPolicy Delete the streams.
    await kube.request("DELETE", f"{TP_PATH.format(ns=namespace)}/{name}")
    await eventually(partial(_is_none, partial(kube.get, "TagPipeline", namespace, name)))
    for stage in ("gateway", "downloader", "inference"):
        gone = partial(_is_none, partial(kube.get, "Deployment", namespace, f"{name}-{stage}"))
        await eventually(gone, within=120)
    assert not await _stream_exists(js, infer.stream)


async def _stream_exists(js: Any, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except Exception:
        return False
    return True


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _is_none(read: Callable[[], Awaitable[Any]]) -> bool:
    return await read() is None
