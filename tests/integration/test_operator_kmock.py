"""The operator (kopf, in-process) against kmock's in-memory API and a real NATS.

kmock does no schema validation, garbage collection or admission: those are
covered by tests/unit/test_crd.py and the rendered owner references here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import kopf
import pytest
from kopf.testing import KopfRunner
from nats.aio.client import Client
from prometheus_client import REGISTRY
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.subjects import HDR_MSG_ID, Lane, Stage, stage_names
from tagpipe_operator import children, loop, reconcile
from tagpipe_operator.handlers import register
from tagpipe_operator.reconcile import Runtime
from tagpipe_operator.settings import OperatorSettings
from tagpipe_operator.spec import parse_spec

from tests.integration.kmock_kit import ApplyingEmulator, find, serve
from tests.kube_rest import KubeClient
from tests.tools import eventually

pytestmark = [pytest.mark.integration, pytest.mark.kmock(cls=ApplyingEmulator)]

NS, NAME = "ns1", "tp1"
PREFIX = "tpk"


def pipeline(nats_url: str) -> dict[str, Any]:
    fast = {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 2}
    return {
        "apiVersion": "tagpipe.io/v1alpha1",
        "kind": "TagPipeline",
        "metadata": {
            "name": NAME,
            "namespace": NS,
            "uid": "uid-1",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {
            "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
            "nats": {"url": nats_url, "prefix": PREFIX},
            "redis": {"url": "redis://127.0.0.1:6379/0"},
            "inference": {
                "replicas": {"min": 1, "max": 5},
                "autoscaling": {
                    "targetBacklogPerReplica": 10,
                    "scaleUpPolicies": [{"type": "Pods", "value": 10, "periodSeconds": 1}],
                    **fast,
                },
            },
            "downloader": {"autoscaling": fast},
        },
    }


@pytest.fixture
async def operator(kmock: Any, nats_proc: ServerProcess) -> AsyncIterator[tuple[Any, KubeClient]]:
    # Depends on nats_proc so that the operator stops before NATS does.
    serve(kmock)
    conn = kopf.ConnectionInfo(server=str(kmock.url), insecure=True)
    settings = OperatorSettings(
        scale_interval_s=0.3,
        nats_timeout_s=0.5,
        converge_retry_s=0.5,
        stream_delete_retries=1,
        stream_delete_retry_s=0.2,
    )
    registry = kopf.OperatorRegistry()
    register(registry, settings, connection=conn)
    # In its own thread and loop (KopfRunner): kopf's shutdown waits on every
    # task of its loop, which would include pytest's own.
    runner = KopfRunner(["run", "--standalone", "--all-namespaces"], registry=registry, timeout=30)
    runner.__enter__()
    kube = KubeClient.from_connection(conn)
    yield kmock, kube
    await kube.close()
    # Join off the loop: kmock, on this loop, must keep serving kopf until it stops.
    await asyncio.to_thread(runner.__exit__, None, None, None)


def obj(kmock: Any, resource: str, name: str) -> dict[str, Any] | None:
    return find(kmock, resource, NS, name)


async def test_children_status_and_backlog_scaling(
    operator: tuple[Any, KubeClient], nats_proc: ServerProcess, nc: Client
) -> None:
    kmock, kube = operator
    await kube.create(pipeline(nats_proc.url))

    dep = await eventually(lambda: obj(kmock, "apps/v1/deployments", f"{NAME}-inference"))
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "TagPipeline",
        NAME,
        "uid-1",
        True,
    )
    for res, name in [
        ("v1/services", f"{NAME}-gateway"),
        ("v1/configmaps", f"{NAME}-config"),
        ("v1/serviceaccounts", f"{NAME}-workers"),
        ("apps/v1/deployments", f"{NAME}-downloader"),
        ("policy/v1/poddisruptionbudgets", f"{NAME}-inference"),
    ]:
        child = await eventually(lambda r=res, n=name: obj(kmock, r, n))
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-1"

    # A spec change re-applies the children: batching reaches the pod env. (That
    # gpu: 0 also removes the T4 placement needs the server's field ownership,
    # which kmock lacks: e2e's test_gpu_off_removes_placement checks it.)
    dep_before = obj(kmock, "apps/v1/deployments", f"{NAME}-inference")
    assert dep_before["spec"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "Tesla-T4"
    }
    await kube.patch(
        "TagPipeline",
        NS,
        NAME,
        {
            "metadata": {"generation": 2},
            "spec": {"inference": {"gpu": 0, "batching": {"maxBatch": 64}}},
        },
    )
    await eventually(lambda: _inference_env(kmock).get("TAGPIPE_MAX_BATCH") == "64")

    # deletionPolicy Retain (the default) needs no finalizer: deletion never blocks
    # (which is why scaling is a loop over an index, not a kopf timer).
    assert "tagpipe.io/streams" not in (
        obj(kmock, "tagpipe.io/v1alpha1/tagpipelines", NAME) or {}
    ).get("metadata", {}).get("finalizers", [])

    # Streams were ensured in the real NATS under the pipeline's prefix.
    js = nc.jetstream()
    infer = stage_names(Stage.INFER, PREFIX)
    await eventually(lambda: _has_stream(js, infer.stream))

    # Drift: a deleted child comes back (the loop recreates it; under kmock, whose
    # watch replays events, kopf's converge sometimes gets there first).
    await kube.delete("ConfigMap", NS, f"{NAME}-config")
    await eventually(lambda: obj(kmock, "v1/configmaps", f"{NAME}-config"))

    # A status with conditions is written by the scaling loop.
    status = await eventually(
        lambda: (
            (obj(kmock, "tagpipe.io/v1alpha1/tagpipelines", NAME) or {})
            .get("status", {})
            .get("conditions")
            and obj(kmock, "tagpipe.io/v1alpha1/tagpipelines", NAME)["status"]
        )
    )
    types = {c["type"] for c in status["conditions"]}
    assert "Deprecated" in types  # deprecations.py: always there, False for this spec
    types.discard("Deprecated")
    assert types == {"Ready", "Degraded", "ScalingLimited", "MetricsStale", "Conflict"}
    await eventually(lambda: _status_when(kmock, lambda s: s["observedGeneration"] == 2))

    # Backlog of 45 on the inference stream (target 10/replica) -> 5 replicas (max 5).
    for i in range(45):
        await js.publish(infer.subject(Lane.BULK), b"x", headers={HDR_MSG_ID: f"m{i}"})
    await eventually(lambda: _replicas(kmock, "inference") == 5)
    status = await eventually(
        lambda: _status_when(kmock, lambda s: s["stages"]["inference"]["backlog"] == 45)
    )
    assert status["stages"]["inference"]["desiredReplicas"] == 5, status
    labels = {"namespace": NS, "pipeline": NAME, "stage": "inference"}
    assert REGISTRY.get_sample_value("tagpipe_operator_desired_replicas", labels) == 5
    up = {"stage": "inference", "direction": "up", "reason": "BacklogAboveTarget"}
    assert (REGISTRY.get_sample_value("tagpipe_operator_scale_events_total", up) or 0) >= 1
    assert status["inference"].endswith("/5")

    # Drain it: back to min (1) only after the 2 s scale-down window.
    await js.purge_stream(infer.stream)
    await eventually(lambda: _replicas(kmock, "inference") == 1)

    # Replicas were written only through the scale subresource, each with an Event.
    reqs = list(kmock)
    scale_writes = [
        r.data["spec"]["replicas"]
        for r in reqs
        if r.method == "PATCH" and r.subresource == "scale" and r.name == f"{NAME}-inference"
    ]
    assert max(scale_writes) == 5 and scale_writes[-1] == 1  # never above max
    assert not [
        r
        for r in reqs
        if r.method == "PATCH"
        and r.subresource is None
        and "deployments" in str(r.url)
        and "/spec/replicas" in r.text
    ]
    # kopf posts events from a background queue: wait for both directions' reasons.
    await eventually(lambda: {"BacklogAboveTarget", "BacklogBelowTarget"} <= _event_reasons(kmock))


def _event_reasons(kmock: Any) -> set[str]:
    return {r.data.get("reason") for r in kmock if r.method == "POST" and "events" in str(r.url)}


def _status_when(kmock: Any, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    status = (obj(kmock, "tagpipe.io/v1alpha1/tagpipelines", NAME) or {}).get("status") or {}
    return status if status.get("conditions") and check(status) else None


def _inference_env(kmock: Any) -> dict[str, Any]:
    dep = obj(kmock, "apps/v1/deployments", f"{NAME}-inference") or {}
    containers = dep.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])
    return {e["name"]: e.get("value") for e in containers[0].get("env", [])}


async def _has_stream(js: Any, name: str) -> bool:
    try:
        await js.stream_info(name)
    except Exception:
        return False
    return True


def _replicas(kmock: Any, stage: str) -> int | None:
    dep = obj(kmock, "apps/v1/deployments", f"{NAME}-{stage}")
    return None if dep is None else dep["spec"].get("replicas")


async def test_delete_policy_removes_streams_and_retain_keeps_no_finalizer(
    operator: tuple[Any, KubeClient], nats_proc: ServerProcess, nc: Client
) -> None:
    kmock, kube = operator
    body = pipeline(nats_proc.url)
    body["spec"]["deletionPolicy"] = "Delete"
    await kube.create(body)
    js = nc.jetstream()
    stream = stage_names(Stage.INFER, PREFIX).stream
    await eventually(lambda: _has_stream(js, stream))
    cr = await eventually(lambda: _with_finalizer(kmock))
    assert "tagpipe.io/streams" in cr["metadata"]["finalizers"]

    await kube.request("DELETE", f"/apis/tagpipe.io/v1alpha1/namespaces/{NS}/tagpipelines/{NAME}")
    await eventually(lambda: obj(kmock, "tagpipe.io/v1alpha1/tagpipelines", NAME) is None)
    assert not await _has_stream(js, stream)
    assert "StreamsDeleted" in _event_reasons(kmock)


async def test_deletion_is_not_blocked_forever_when_nats_is_gone(
    operator: tuple[Any, KubeClient],
) -> None:
    kmock, kube = operator
    body = pipeline("nats://127.0.0.1:9")  # nothing listens there
    body["spec"]["deletionPolicy"] = "Delete"
    await kube.create(body)
    await eventually(lambda: _with_finalizer(kmock))
    await kube.request("DELETE", f"/apis/tagpipe.io/v1alpha1/namespaces/{NS}/tagpipelines/{NAME}")
    await eventually(lambda: obj(kmock, "tagpipe.io/v1alpha1/tagpipelines", NAME) is None)
    await eventually(lambda: "StreamsRetained" in _event_reasons(kmock))


def _with_finalizer(kmock: Any) -> dict[str, Any] | None:
    cr = obj(kmock, "tagpipe.io/v1alpha1/tagpipelines", NAME)
    return cr if cr and cr["metadata"].get("finalizers") else None


async def test_one_tick_recreates_drift_and_reports_it(
    kmock: Any, nats_proc: ServerProcess
) -> None:
    """loop.tick() alone (no kopf): deterministic drift correction and status."""
    serve(kmock)
    conn = kopf.ConnectionInfo(server=str(kmock.url), insecure=True)
    rt = Runtime(settings=OperatorSettings(nats_timeout_s=2.0), connection=conn)
    body = pipeline(nats_proc.url)
    kube = KubeClient.from_connection(conn)
    try:
        await kube.create(body)
        spec = parse_spec(body["spec"])
        await children.converge(rt, NAME, NS, "uid-1", spec, 1)
        await reconcile.ensure_pipeline_streams(rt, NS, spec)
        await eventually(lambda: rt.children().synced)
        await kube.delete("Deployment", NS, f"{NAME}-downloader")
        await eventually(lambda: rt.children().get("Deployment", NS, f"{NAME}-downloader") is None)

        status = await loop.tick(rt, body)
        assert obj(kmock, "apps/v1/deployments", f"{NAME}-downloader") is not None
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        assert (
            degraded["status"] == "True"
            and "recreated Deployment/tp1-downloader" in degraded["message"]
        )
        assert status["backlog"] == 0 and status["stages"]["inference"]["backlog"] == 0
        stale = next(c for c in status["conditions"] if c["type"] == "MetricsStale")
        assert stale["status"] == "False"
        # The status went through the status subresource.
        written = obj(kmock, "tagpipe.io/v1alpha1/tagpipelines", NAME)["status"]
        assert written["conditions"] == status["conditions"]

        await eventually(lambda: rt.children().get("Deployment", NS, f"{NAME}-downloader"))
        again = await loop.tick(rt, body)
        assert (
            "recreated"
            not in next(c for c in again["conditions"] if c["type"] == "Degraded")["message"]
        )
    finally:
        await rt.close()
        await kube.close()


async def test_a_tick_on_a_snapshot_older_than_the_deletion_does_not_recreate_streams(
    kmock: Any, nats_proc: ServerProcess, nc: Client
) -> None:
    """The scaling loop ticks on its index snapshot, which can predate the
    deletion: retire() waits out a tick in flight and keeps later ones off."""
    serve(kmock)
    conn = kopf.ConnectionInfo(server=str(kmock.url), insecure=True)
    rt = Runtime(settings=OperatorSettings(nats_timeout_s=2.0), connection=conn)
    body = pipeline(nats_proc.url)
    js, stream = nc.jetstream(), stage_names(Stage.INFER, PREFIX).stream
    try:
        kube = KubeClient.from_connection(conn)
        await kube.create(body)
        await kube.close()
        spec = parse_spec(body["spec"])
        await reconcile.ensure_pipeline_streams(rt, NS, spec, NAME)
        in_flight = rt.tick_lock("uid-1")
        await in_flight.acquire()  # a tick holds it
        retiring = asyncio.create_task(rt.retire("uid-1"))
        await asyncio.sleep(0.05)
        assert not retiring.done()  # the delete handler waits for the tick
        in_flight.release()
        await retiring

        await reconcile.remove_streams(rt, NS, spec)
        reconcile.forget(rt, NS, NAME)
        writes_before = len(list(kmock))
        await loop._guarded_tick(rt, body)  # the stale snapshot: no deletionTimestamp
        assert not await _has_stream(js, stream)
        assert len(list(kmock)) == writes_before  # no Kubernetes call at all
    finally:
        await rt.close()
