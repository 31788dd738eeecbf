"""The operator, as its own process with the chart's RBAC, against a real API server:
validation, children, backlog scaling, stale metrics, restarts and deletion."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    TP_PATH,
    OperatorProcess,
    admin_kubeconfig,
    conditions,
    eventually,
    run,
    tagpipeline,
    token_kubeconfig,
)
from nats.aio.client import Client
from tagpipe_cli.servers import ServerProcess, free_port
from tagpipe_common.nats_io import connect_nats
from tagpipe_common.subjects import Lane, Stage, stage_names

from tests.kube_rest import ApiError, KubeClient

STAGES = ("gateway", "downloader", "inference")


def pipeline(name: str, nats_url: str, prefix: str, policy: str = "Delete") -> dict[str, Any]:
    """A small CPU pipeline; the downloader scales 1..6 at 50 messages per replica."""
    fast = {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 5}
    downloader = {
        "replicas": {"min": 1, "max": 6},
        "autoscaling": {
            **fast,
            "targetBacklogPerReplica": 50,
            "scaleUpPolicies": [{"type": "Pods", "value": 10, "periodSeconds": 1}],
        },
    }
    return tagpipeline(name, nats_url, prefix, downloader, {"autoscaling": fast}, policy)


async def create(kube: KubeClient, ns: str, body: dict[str, Any]) -> dict[str, Any]:
    return await kube.request("POST", TP_PATH.format(ns=ns), body)


async def replicas(kube: KubeClient, ns: str, deployment: str) -> int | None:
    dep = await kube.get("Deployment", ns, deployment)
    return None if dep is None else int(dep["spec"].get("replicas") or 0)


async def condition(kube: KubeClient, ns: str, name: str, type_: str) -> dict[str, Any]:
    found = [c for c in conditions(await kube.get("TagPipeline", ns, name)) if c["type"] == type_]
    return found[0] if found else {}


async def publish(nc: Client, prefix: str, count: int, tag: str) -> None:
    js, subject = nc.jetstream(), stage_names(Stage.DOWNLOAD, prefix).subject(Lane.BULK)
    for i in range(count):
        await js.publish(subject, b"x", headers={"Nats-Msg-Id": f"{tag}-{i}"})


async def stream_exists(nc: Client, stream: str) -> bool:
    try:
        await nc.jetstream().stream_info(stream)
    except Exception:
        return False
    return True


def equals(read: Callable[[], Awaitable[Any]], expected: Any) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(await read() == expected)

    return check


def gone(read: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[bool]]:
    return equals(read, None)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("inference", "gpu"), -1, "spec.inference.gpu"),
        (("deletionPolicy",), "Keep", "spec.deletionPolicy"),
        (("nats", "url"), "http://nats:4222", "spec.nats.url"),
        (("nats", "prefix"), "Bad_Prefix", "spec.nats.prefix"),
        (("model", "storageUri"), "ftp://models/m", "spec.model.storageUri"),
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
        await create(kube, namespace, body)
    assert err.value.status == 422
    assert field in str(err.value)


async def test_children_backlog_scaling_drift_and_deletion(
    kube: KubeClient, namespace: str, operator: OperatorProcess, nats_url: str, nc: Client
) -> None:
    name, prefix = "e2e", f"e2e{uuid.uuid4().hex[:6]}"
    uid = (await create(kube, namespace, pipeline(name, nats_url, prefix)))["metadata"]["uid"]
    for stage in STAGES:  # children appear, owned by the TagPipeline
        dep = await eventually(partial(kube.get, "Deployment", namespace, f"{name}-{stage}"))
        assert dep["metadata"]["ownerReferences"][0]["uid"] == uid
    svc = await eventually(partial(kube.get, "Service", namespace, f"{name}-gateway"))
    assert svc["metadata"]["ownerReferences"][0]["uid"] == uid

    # A 300-message backlog at 50 per replica scales the downloader 1 -> 6 (no pod is ever
    # ready: the Pods stay Pending without a kubelet).
    download = stage_names(Stage.DOWNLOAD, prefix).stream
    await eventually(partial(stream_exists, nc, download), within=30)
    await publish(nc, prefix, 300, "lifecycle")
    down = f"{name}-downloader"
    await eventually(equals(partial(replicas, kube, namespace, down), 6))

    # Drained: the operator sees backlog 0 and still holds 6 (the 5 s window has not
    # passed), then scales back to 1 after the window.
    await nc.jetstream().purge_stream(download)

    async def sees_drained() -> Any:
        tp = await kube.get("TagPipeline", namespace, name)
        stage = (((tp or {}).get("status") or {}).get("stages") or {}).get("downloader") or {}
        return stage if stage.get("backlog") == 0 else None

    seen = await eventually(sees_drained)
    assert seen["desiredReplicas"] == 6, seen
    await eventually(equals(partial(replicas, kube, namespace, down), 1))
    types = {c["type"] for c in conditions(await kube.get("TagPipeline", namespace, name))}
    assert types >= {"Ready", "Degraded", "ScalingLimited", "MetricsStale", "Conflict"}, types

    # A deleted child is recreated (drift correction).
    await kube.request("DELETE", f"/api/v1/namespaces/{namespace}/configmaps/{name}-config")
    await eventually(partial(kube.get, "ConfigMap", namespace, f"{name}-config"))


async def test_deletion_policy_delete_removes_streams_retain_keeps_them(
    kube: KubeClient, namespace: str, operator: OperatorProcess, nats_url: str, nc: Client
) -> None:
    prefix = f"del{uuid.uuid4().hex[:6]}"
    for name, policy in (("dropped", "Delete"), ("kept", "Retain")):
        await create(kube, namespace, pipeline(name, nats_url, f"{prefix}{name}", policy))
    streams = {
        name: [stage_names(s, f"{prefix}{name}").stream for s in Stage]
        for name in ("dropped", "kept")
    }
    for stream in streams["dropped"] + streams["kept"]:
        await eventually(partial(stream_exists, nc, stream), within=30)
    for name in ("dropped", "kept"):
        await eventually(partial(kube.get, "Deployment", namespace, f"{name}-inference"))
        await kube.request("DELETE", f"{TP_PATH.format(ns=namespace)}/{name}")
    for name in ("dropped", "kept"):
        await eventually(gone(partial(kube.get, "TagPipeline", namespace, name)))
        for stage in STAGES:  # garbage collection, through the owner references
            child = partial(kube.get, "Deployment", namespace, f"{name}-{stage}")
            await eventually(gone(child), within=120)
        await eventually(gone(partial(kube.get, "Service", namespace, f"{name}-gateway")))
    for stream in streams["dropped"]:
        assert not await stream_exists(nc, stream)
    for stream in streams["kept"]:
        assert await stream_exists(nc, stream)


async def test_unreachable_nats_is_a_condition_and_one_warning_per_tick(
    kube: KubeClient, namespace: str, start_operator: Callable[..., OperatorProcess]
) -> None:
    url, name = f"nats://127.0.0.1:{free_port()}", "nonats"
    started = time.monotonic()
    operator = start_operator(namespace)
    await create(kube, namespace, pipeline(name, url, "nonats", policy="Retain"))

    async def stale() -> dict[str, Any] | None:
        c = await condition(kube, namespace, name, "MetricsStale")
        return c if c.get("status") == "True" else None

    cond = await eventually(stale)
    assert cond["reason"] == "NatsUnavailable" and url in cond["message"], cond
    # Children do not wait for NATS.
    await eventually(partial(kube.get, "Deployment", namespace, f"{name}-downloader"))

    def warnings() -> list[dict[str, Any]]:
        return [r for r in operator.records() if f"{namespace}/{name}" in str(r.get("msg"))]

    await eventually(lambda: len(warnings()) >= 4)
    elapsed = time.monotonic() - started
    records = operator.records()
    assert all(r["level"] == "WARNING" and url in r["msg"] for r in warnings()), operator.tail()
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL", "RAW")], operator.tail()
    assert not [r for r in records if "exc" in r or "Traceback" in str(r)], operator.tail()
    # One line per 1 s tick (plus converge's one), never one per reconnect attempt:
    # the bound uses the test's clock, which runs at least as long as the operator's.
    assert len(warnings()) <= elapsed / 1.0 + 2, operator.tail()


async def test_stale_metrics_hold_replicas_and_recover(
    kube: KubeClient,
    namespace: str,
    operator: OperatorProcess,
    own_nats: ServerProcess,
) -> None:
    name, prefix = "stale", "stale"
    await create(kube, namespace, pipeline(name, own_nats.url, prefix, policy="Retain"))
    nc = await connect_nats([own_nats.url], "tagpipe-e2e-stale")
    try:
        await eventually(partial(stream_exists, nc, stage_names(Stage.DOWNLOAD, prefix).stream))
        await publish(nc, prefix, 200, "stale")
    finally:
        await nc.close()
    down = f"{name}-downloader"
    await eventually(equals(partial(replicas, kube, namespace, down), 4))

    own_nats.stop()
    cond = await eventually(
        partial(_with_status, kube, namespace, name, "MetricsStale", "True"), within=30
    )
    assert cond["reason"] == "NatsUnavailable" and own_nats.url in cond["message"], cond
    assert await replicas(kube, namespace, down) == 4  # held, not guessed

    own_nats.start()  # same port and data: the 200 messages are still queued
    await eventually(
        partial(_with_status, kube, namespace, name, "MetricsStale", "False"), within=60
    )
    assert await replicas(kube, namespace, down) == 4

    # NATS gone for good: shutdown closes the dead connection without raising.
    own_nats.stop()
    operator.stop()
    assert operator.proc is not None and operator.proc.returncode == 0, operator.tail()
    bad = [r for r in operator.records() if r["level"] in ("ERROR", "CRITICAL", "RAW")]
    assert not bad, operator.tail()


async def _with_status(
    kube: KubeClient, ns: str, name: str, type_: str, status: str
) -> dict[str, Any] | None:
    cond = await condition(kube, ns, name, type_)
    return cond if cond.get("status") == status else None


async def test_restart_during_scale_up_never_scales_down_before_a_full_window(
    kube: KubeClient, namespace: str, operator: OperatorProcess, nats_url: str, nc: Client
) -> None:
    name, prefix, window = "restart", f"rs{uuid.uuid4().hex[:6]}", 15.0
    body = pipeline(name, nats_url, prefix, policy="Retain")
    auto = body["spec"]["downloader"]["autoscaling"]
    auto["scaleDownStabilizationSeconds"] = int(window)
    # 2 pods per half hour, counted from ready pods (none): the scale-up stops part way.
    auto["scaleUpPolicies"] = [{"type": "Pods", "value": 2, "periodSeconds": 1800}]
    await create(kube, namespace, body)
    await eventually(partial(stream_exists, nc, stage_names(Stage.DOWNLOAD, prefix).stream))
    await publish(nc, prefix, 300, "restart")
    await eventually(partial(_with_status, kube, namespace, name, "ScalingLimited", "True"))
    down = f"{name}-downloader"
    held = await replicas(kube, namespace, down)
    assert held is not None and 1 < held < 6

    operator.restart()
    restarted = time.monotonic()
    await nc.jetstream().purge_stream(stage_names(Stage.DOWNLOAD, prefix).stream)
    # Until a full window has passed since the restart, no sample may be below `held`;
    # after it, the drained stage goes back to 1. A sample taken late only errs towards
    # passing, so a busy machine cannot fail this.
    while (now := await replicas(kube, namespace, down)) != 1:
        assert now is not None and (now >= held or time.monotonic() - restarted >= window), (
            f"scaled down to {now} {time.monotonic() - restarted:.1f}s after the restart"
        )
        assert time.monotonic() - restarted < window + 90, operator.tail()
        await asyncio.sleep(0.5)


async def test_the_rbac_check_catches_a_call_the_token_may_not_make(
    namespace: str, tmp_path: Path
) -> None:
    """The check every operator fixture runs at teardown, shown to fail: the namespace's
    `default` ServiceAccount has none of the chart's rules."""
    await eventually(lambda: run("kubectl", "-n", namespace, "get", "sa", "default", check=False))
    token = run("kubectl", "-n", namespace, "create", "token", "default").strip()
    config = token_kubeconfig(admin_kubeconfig(), token, tmp_path / "nobody.kubeconfig")
    proc = OperatorProcess(config, namespace, tmp_path / "operator.log").start()
    try:
        await eventually(proc.forbidden, within=30)
        assert proc.proc is not None and proc.proc.poll() is None, "a 403 must not end it"
    finally:
        proc.stop()
