"""The operator in a shared cluster: leader election, field ownership, no take-overs.

All on the real API server (with OwnerReferencesPermissionEnforcement, see run.sh),
each operator a process of its own with the chart's ServiceAccount token.
"""

from __future__ import annotations

import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

from e2e_helpers import OperatorProcess, conditions, eventually, run, tagpipeline
from nats.aio.client import Client
from tagpipe_common.subjects import Lane, Stage, stage_names

from tests.kube_rest import ApiError, KubeClient

TP_PATH = "/apis/tagpipe.io/v1alpha1/namespaces/{ns}/tagpipelines"
LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


def scaling_downloader() -> dict[str, Any]:
    """1..6 replicas at 50 messages each, no stabilization: a backlog of 300 means 6."""
    return {
        "replicas": {"min": 1, "max": 6},
        "autoscaling": {
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": 30,
            "targetBacklogPerReplica": 50,
            "scaleUpPolicies": [{"type": "Pods", "value": 10, "periodSeconds": 1}],
        },
    }


async def holder(kube: KubeClient, ns: str, name: str) -> str | None:
    try:
        lease = await kube.request("GET", LEASE_PATH.format(ns=ns, name=name))
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    return (lease.get("spec") or {}).get("holderIdentity") or None


async def replicas(kube: KubeClient, ns: str, name: str) -> int:
    dep = await kube.get("Deployment", ns, name)
    return int(((dep or {}).get("spec") or {}).get("replicas") or 0)


async def _stream_exists(js: Any, name: str) -> bool:
    try:
        await js.stream_info(name)
    except Exception:
        return False
    return True


async def test_killed_leader_hands_the_lease_over_and_scaling_goes_on(
    kube: KubeClient,
    namespace: str,
    start_operator: Any,
    operator_release: tuple[Path, str, str],
    nats_url: str,
    nc: Client,
) -> None:
    _, release_ns, _ = operator_release
    lease = f"tagpipe-operator-{namespace}"
    first: OperatorProcess = start_operator(namespace)
    second: OperatorProcess = start_operator(namespace)
    ops = {p.settings["POD_NAME"]: p for p in (first, second)}
    name, prefix = "ha", f"ha{uuid.uuid4().hex[:6]}"
    body = tagpipeline(name, nats_url, prefix, scaling_downloader())
    await kube.request("POST", TP_PATH.format(ns=namespace), body)
    down = f"{name}-downloader"
    await eventually(partial(kube.get, "Deployment", namespace, down), within=60)
    leader = await eventually(partial(holder, kube, release_ns, lease))
    assert leader in ops, leader
    # Only the leader writes: the standby's log has no converge and no scaling.
    standby = next(p for n, p in ops.items() if n != leader)
    assert not [ln for ln in standby.lines() if "converge" in ln.lower()], standby.tail()

    stream = stage_names(Stage.DOWNLOAD, prefix)
    js = nc.jetstream()
    await eventually(partial(_stream_exists, js, stream.stream))  # the leader made it

    ops[leader].kill()
    killed = time.monotonic()
    for i in range(300):  # published after the kill: only the new leader can act on it
        await js.publish(stream.subject(Lane.BULK), b"x", headers={"Nats-Msg-Id": f"ha-{i}"})

    async def taken_over() -> bool:
        return await holder(kube, release_ns, lease) == standby.settings["POD_NAME"]

    await eventually(taken_over, within=20 - (time.monotonic() - killed))

    async def scaled_up() -> bool:
        return await replicas(kube, namespace, down) > 1

    await eventually(scaled_up, within=30 - (time.monotonic() - killed))


async def test_a_converge_keeps_fields_it_does_not_own(
    kube: KubeClient, namespace: str, operator: OperatorProcess, nats_url: str
) -> None:
    """Server-side apply: `kubectl rollout restart` survives a converge, and a field the
    operator stops rendering (gpu: 0 drops the T4 placement) is removed."""
    name = "ssa"
    body = tagpipeline(name, nats_url, f"ssa{uuid.uuid4().hex[:6]}", {}, {"gpu": 1})
    await kube.request("POST", TP_PATH.format(ns=namespace), body)
    dep_name = f"{name}-inference"
    dep = await eventually(partial(kube.get, "Deployment", namespace, dep_name))
    assert dep["spec"]["template"]["spec"].get("nodeSelector"), "gpu: 1 places on a GPU node"
    managers = {(m["manager"], m["operation"]) for m in dep["metadata"]["managedFields"]}
    assert ("tagpipe-operator", "Apply") in managers, managers

    run("kubectl", "-n", namespace, "rollout", "restart", f"deployment/{dep_name}")
    patch = {"spec": {"inference": {"gpu": 0, "batching": {"maxBatch": 48}}}}
    await kube.patch("TagPipeline", namespace, name, patch)

    async def converged() -> dict[str, Any] | None:
        got = await kube.get("Deployment", namespace, dep_name)
        pod = ((got or {}).get("spec") or {}).get("template") or {}
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}
        return pod if env.get("TAGPIPE_MAX_BATCH") == "48" else None

    pod = await eventually(converged)
    assert RESTARTED_AT in (pod["metadata"].get("annotations") or {}), pod["metadata"]
    assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"], pod["spec"]
    limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in limits


async def _events(kube: KubeClient, ns: str, reason: str) -> list[str]:
    listing = await kube.request("GET", f"/api/v1/namespaces/{ns}/events")
    return [e.get("message", "") for e in listing.get("items") or [] if e.get("reason") == reason]


async def test_an_object_it_does_not_own_is_left_untouched_and_reported(
    kube: KubeClient, namespace: str, operator: OperatorProcess, nats_url: str
) -> None:
    """A ConfigMap made by hand with a child's name: untouched, a Conflict condition and
    an Event name it, Ready is False with that reason, observedGeneration does not move,
    the other children are applied; once it is gone, the operator's own takes its place.
    A TagPipeline named `default` leaves the namespace's `default` ServiceAccount alone."""
    name, taken = "default", "default-config"
    theirs = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": taken, "namespace": namespace},
        "data": {"owner": "someone else"},
    }
    await kube.request("POST", f"/api/v1/namespaces/{namespace}/configmaps", theirs)
    body = tagpipeline(name, nats_url, f"tk{uuid.uuid4().hex[:6]}", {})
    await kube.request("POST", TP_PATH.format(ns=namespace), body)

    async def conflict() -> dict[str, Any] | None:
        tp = await kube.get("TagPipeline", namespace, name)
        found = {c["type"]: c for c in conditions(tp)}
        return tp if found.get("Conflict", {}).get("status") == "True" else None

    tp = await eventually(conflict)
    found = {c["type"]: c for c in conditions(tp)}
    assert f"ConfigMap/{taken}" in found["Conflict"]["message"], found
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "Conflict")
    assert tp["status"].get("observedGeneration") is None, tp["status"]
    cm = await kube.get("ConfigMap", namespace, taken)
    assert cm is not None and cm["data"] == {"owner": "someone else"}
    assert not cm["metadata"].get("ownerReferences"), cm["metadata"]
    for stage in ("gateway", "downloader", "inference"):  # the rest is applied all the same
        await eventually(partial(kube.get, "Deployment", namespace, f"{name}-{stage}"))
    messages = await eventually(partial(_events, kube, namespace, "Conflict"))
    assert any(f"ConfigMap/{taken}" in m for m in messages), messages
    default_sa = await kube.get("ServiceAccount", namespace, "default")
    assert default_sa is not None and not default_sa["metadata"].get("ownerReferences")
    workers = await eventually(partial(kube.get, "ServiceAccount", namespace, "default-workers"))
    assert workers["metadata"]["ownerReferences"][0]["uid"] == tp["metadata"]["uid"]

    await kube.request("DELETE", f"/api/v1/namespaces/{namespace}/configmaps/{taken}")

    async def resolved() -> dict[str, Any] | None:
        got = await kube.get("TagPipeline", namespace, name)
        status = (got or {}).get("status") or {}
        found = {c["type"]: c["status"] for c in conditions(got)}
        ok = found.get("Conflict") == "False" and status.get("observedGeneration") == 1
        return got if ok else None

    await eventually(resolved, within=90)
    ours = await kube.get("ConfigMap", namespace, taken)
    assert ours is not None and ours["metadata"]["ownerReferences"][0]["name"] == name


async def test_a_child_the_api_refuses_is_named_with_the_apis_reason(
    kube: KubeClient, namespace: str, operator: OperatorProcess, nats_url: str
) -> None:
    """A ResourceQuota allows no PodDisruptionBudget: the API refuses those children
    (403 Forbidden, exceeded quota). The rest is applied, Ready is False with the
    API's reason and names each refused object, observedGeneration does not move, and
    the operator keeps running (it backs off; no crash loop)."""
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pdbs", "namespace": namespace},
        "spec": {"hard": {"count/poddisruptionbudgets.policy": "0"}},
    }
    await kube.request("POST", f"/api/v1/namespaces/{namespace}/resourcequotas", quota)

    async def quota_counted() -> bool:  # the quota controller has filled in its status
        got = await kube.request("GET", f"/api/v1/namespaces/{namespace}/resourcequotas/no-pdbs")
        return bool((got.get("status") or {}).get("hard"))

    await eventually(quota_counted)
    name = "refused"
    body = tagpipeline(name, nats_url, f"rf{uuid.uuid4().hex[:6]}", {})
    await kube.request("POST", TP_PATH.format(ns=namespace), body)

    async def refused() -> dict[str, Any] | None:
        tp = await kube.get("TagPipeline", namespace, name)
        ready = {c["type"]: c for c in conditions(tp)}.get("Ready", {})
        return ready if ready.get("reason") == "Forbidden" else None

    ready = await eventually(refused)
    assert ready["status"] == "False", ready
    for stage in ("gateway", "downloader", "inference"):
        assert f"PodDisruptionBudget/{name}-{stage}" in ready["message"], ready
        assert await kube.get("Deployment", namespace, f"{name}-{stage}") is not None
    tp = await kube.get("TagPipeline", namespace, name)
    assert (tp or {}).get("status", {}).get("observedGeneration") is None
    assert operator.proc is not None and operator.proc.poll() is None
