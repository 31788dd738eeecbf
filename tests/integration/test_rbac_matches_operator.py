"""The chart's ClusterRole allows every API call the operator makes, and nothing it never makes.

The real operator (kopf, in-process, the same `register()` as `tagpipe-operator`) runs
against kmock, which records every request, and a real NATS. The test drives each code
path that talks to the Kubernetes API: create (children, streams, a NATS URL read from a
Secret), spec update (patches), the scaling timer (backlog, `deployments/scale`,
Events, status), a child deleted behind the operator's back (re-created), and deletion
under `deletionPolicy: Delete` (finalizer, stream removal). Each recorded request
becomes an RBAC triple (apiGroup, resource[/subresource], verb), compared with the rules
`helm template` renders.

kopf's own needs, all observed rather than assumed: discovery (/api, /apis: non-resource
URLs every account may read), list+watch of the CRD's plural and of
customresourcedefinitions (it rescans when CRDs change), patches of the CR (progress
annotations, finalizer) and of its status subresource, core/v1 Events. Peering is not
used (`standalone=True`): replicas elect a leader through a coordination.k8s.io Lease
(leader.py), which runs here too, so it needs no kopf.dev rules.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf
import pytest
import yaml
from nats.aio.client import Client
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.subjects import HDR_MSG_ID, Lane, Stage, stage_names
from tagpipe_operator.handlers import register
from tagpipe_operator.kube import KubeClient
from tagpipe_operator.leader import LeaderElector
from tagpipe_operator.settings import OperatorSettings

from tests.integration.kmock_kit import APPLY, RESOURCES, ApplyingEmulator, find, serve
from tests.kube_rest import path_for
from tests.tools import ROOT, eventually, helm_binary

pytestmark = [pytest.mark.integration, pytest.mark.kmock(cls=ApplyingEmulator)]

NS, NAME, PREFIX = "apps", "rbac1", "rbac"
Triple = tuple[str, str, str]
MARK = "X-Tagpipe-Rbac-Test"  # on the test's own requests, which are not the operator's

# Served by kmock: every resource the operator is expected to touch, plus the ones an
# operator commonly reaches for (pods, leases, kopf peering). A call to any of them shows
# up in the comparison; a call to a resource not served here is recorded too (as a 404).
SERVED = {
    **RESOURCES,
    "events.k8s.io/v1/events": ("Event", True, []),
    "v1/pods": ("Pod", True, []),
    "coordination.k8s.io/v1/leases": ("Lease", True, []),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", False, []),
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", True, []),
}

# The only rules kopf needs in a real cluster that this scenario cannot show. kopf lists
# and watches namespaces only when the operator watches one namespace (TAGPIPE_NAMESPACE;
# kopf/_core/reactor/observation.py namespace_observer). The chart runs it cluster-wide,
# and kmock 0.8 cannot serve GET /api/v1/namespaces (its path parser takes `namespaces`
# for a namespace prefix), so this mode is not driven here. Everything else kopf does in
# a real cluster (discovery, list+watch of CRDs and of the CR, PATCH of the CR and its
# /status, POST of core/v1 Events) it also does against kmock; kopf never GETs a single
# object or CRD, and never posts events.k8s.io Events.
NAMESPACED_MODE_ONLY = {("", "namespaces", "list"), ("", "namespaces", "watch")}
# Never called, checked by the API server's OwnerReferencesPermissionEnforcement admission
# plugin on each child whose ownerReference sets blockOwnerDeletion (make e2e runs with it).
ADMISSION_ONLY = {("tagpipe.io", "tagpipelines/finalizers", "update")}

# The scenario runs once per session and serves both tests (or re-raises its failure).
_observed: set[Triple] | BaseException | None = None


def rendered_rules() -> set[Triple]:
    cmd = [helm_binary(), "template", "rel", str(ROOT / "charts" / "tagpipe"), "--namespace", "tp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    assert roles, "the chart renders no ClusterRole or Role"
    triples = set()
    for role in roles:
        for rule in role["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    triples |= {(group, res, verb) for verb in rule["verbs"]}
    assert not [t for t in triples if "*" in t], "wildcards are never least privilege"
    return triples


def as_triple(req: Any) -> Triple | None:
    """The RBAC (apiGroup, resource, verb) of one recorded request; None for discovery."""
    if req.resource is None or req.resource.plural is None:
        return None  # /api, /apis, /version: discovery, allowed to every account
    resource = req.resource.plural + (f"/{req.subresource}" if req.subresource else "")
    method = str(req.method.value if hasattr(req.method, "value") else req.method).upper()
    if method == "GET":
        watching = str(req.params.get("watch", "")).lower() in ("1", "true")
        verb = "watch" if watching else "get" if req.name else "list"
    else:
        named = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
        verb = named[method] if req.name or method == "POST" else "deletecollection"
    return req.resource.group or "", resource, verb


def pipeline(nats_url: str) -> dict[str, Any]:
    fast = {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 1}
    meta = {"name": NAME, "namespace": NS, "uid": "uid-rbac", "generation": 1}
    return {
        "apiVersion": "tagpipe.io/v1alpha1",
        "kind": "TagPipeline",
        "metadata": {**meta, "resourceVersion": "1"},
        "spec": {
            "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
            # The placeholder URL is overridden by the Secret, as in production.
            "nats": {
                "url": "nats://placeholder:4222",
                "credentialsSecretRef": {"name": "nats-creds", "key": "url"},
                "prefix": PREFIX,
            },
            "redis": {"url": "redis://127.0.0.1:6379/0"},
            "inference": {
                "gpu": 0,
                "replicas": {"min": 1, "max": 3},
                "autoscaling": {
                    "targetBacklogPerReplica": 5,
                    "scaleUpPolicies": [{"type": "Pods", "value": 5, "periodSeconds": 1}],
                    **fast,
                },
            },
            "deletionPolicy": "Delete",
        },
    }


def secret(nats_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "nats-creds", "namespace": NS},
        "data": {"url": base64.b64encode(nats_url.encode()).decode()},
    }


class UserClient:
    """The test's own writes (what users and kubectl do), marked so they are left out."""

    def __init__(self, server: str) -> None:
        self.server = server.rstrip("/")
        self.session = aiohttp.ClientSession(headers={MARK: "1"})

    async def __aenter__(self) -> UserClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.session.close()

    async def create(self, obj: dict[str, Any]) -> None:
        path = path_for(obj["kind"], obj["metadata"]["namespace"])
        async with self.session.post(self.server + path, json=obj) as resp:
            assert resp.status < 400, await resp.text()

    async def delete(self, kind: str, name: str) -> None:
        async with self.session.delete(self.server + path_for(kind, NS, name)) as resp:
            assert resp.status < 400, await resp.text()

    async def patch(self, kind: str, name: str, body: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        url = self.server + path_for(kind, NS, name)
        async with self.session.patch(url, json=body, headers=headers) as resp:
            assert resp.status < 400, await resp.text()


@contextlib.asynccontextmanager
async def running_operator(kmock: Any, namespace: str | None) -> AsyncIterator[None]:
    """The operator as `tagpipe-operator` runs it (main()), pointed at kmock."""
    conn = kopf.ConnectionInfo(server=str(kmock.url), insecure=True)
    settings = OperatorSettings(
        scale_interval_s=0.3,
        nats_timeout_s=0.5,
        converge_retry_s=0.5,
        stream_delete_retry_s=0.5,
        namespace=namespace,
    )
    kube = KubeClient.from_connection(conn)
    leader = LeaderElector(kube, "tagpipe-system", "tagpipe-operator", "op-0", renew_s=0.3)
    await leader.acquire()
    holding = asyncio.create_task(leader.hold(asyncio.Event()))
    registry = kopf.OperatorRegistry()
    register(registry, settings, connection=conn, elector=leader)
    stop = asyncio.Event()
    operator = kopf.operator(
        registry=registry,
        standalone=True,
        clusterwide=namespace is None,
        namespaces=[namespace] if namespace else (),
        stop_flag=stop,
    )
    task = asyncio.create_task(operator)
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)
        holding.cancel()
        await leader.release()
        await kube.close()


def obj(kmock: Any, resource: str, name: str) -> dict[str, Any] | None:
    return find(kmock, resource, NS, name)


def handled_spec(kmock: Any) -> str:
    meta = (obj(kmock, "tagpipe.io/v1alpha1/tagpipelines", NAME) or {}).get("metadata", {})
    return str(meta.get("annotations", {}).get("kopf.zalando.org/last-handled-configuration"))


def replicas(kmock: Any, stage: str) -> int | None:
    dep = obj(kmock, "apps/v1/deployments", f"{NAME}-{stage}")
    return None if dep is None else dep["spec"].get("replicas")


async def drive_every_api_path(kmock: Any, kube: UserClient, nats_url: str, nc: Client) -> None:
    deployments = "apps/v1/deployments"
    await kube.create(secret(nats_url))
    await kube.create(pipeline(nats_url))
    await eventually(lambda: obj(kmock, deployments, f"{NAME}-inference"))
    await eventually(lambda: obj(kmock, "policy/v1/poddisruptionbudgets", f"{NAME}-inference"))

    # Spec update: kopf's update handler converges (patches) the children; it is done when
    # kopf records the new spec as handled.
    body = {"metadata": {"generation": 2}, "spec": {"inference": {"batching": {"maxBatch": 8}}}}
    await kube.patch("TagPipeline", NAME, body)
    await eventually(lambda: '"maxBatch":8' in handled_spec(kmock))

    # Backlog: the timer scales through deployments/scale, posts Events, writes status.
    js = nc.jetstream()
    infer = stage_names(Stage.INFER, PREFIX)
    for i in range(12):
        await js.publish(infer.subject(Lane.BULK), b"x", headers={HDR_MSG_ID: f"r{i}"})
    await eventually(lambda: replicas(kmock, "inference") == 3)

    # A child deleted behind the operator's back (through the API, so that its watch,
    # and so the operator's cache, sees it go) is re-created by the timer.
    await kube.delete("Deployment", f"{NAME}-downloader")
    await eventually(lambda: obj(kmock, deployments, f"{NAME}-downloader"))

    # Deletion (kmock has no API-server deletion semantics: set the timestamp as it would):
    # the finalizer's handler removes the streams, then kopf releases the finalizer.
    when = {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}
    await kube.patch("TagPipeline", NAME, when)
    await eventually(
        lambda: (
            "tagpipe.io/streams"
            not in (obj(kmock, "tagpipe.io/v1alpha1/tagpipelines", NAME) or {})
            .get("metadata", {})
            .get("finalizers", [])
        )
    )


async def observed_calls(kmock: Any, nats_url: str, nc: Client) -> set[Triple]:
    global _observed
    if _observed is None:
        serve(kmock, SERVED)
        try:
            async with running_operator(kmock, None), UserClient(str(kmock.url)) as user:
                await drive_every_api_path(kmock, user, nats_url, nc)
        except BaseException as exc:
            _observed = exc
            raise
        _observed = calls(kmock)
    if isinstance(_observed, BaseException):
        raise AssertionError("the operator scenario failed in an earlier test") from _observed
    return _observed


def calls(kmock: Any) -> set[Triple]:
    """Every triple the operator's requests need. A server-side apply is a PATCH, and
    the API server also authorizes `create` for it when it creates the object."""
    out: set[Triple] = set()
    for req in list(kmock):
        t = None if MARK in req.headers else as_triple(req)
        if t is not None:
            out.add(t)
            if APPLY in req.headers.get("Content-Type", ""):
                out.add((t[0], t[1], "create"))
    return out


async def test_every_operator_call_is_allowed(
    kmock: Any, nats_proc: ServerProcess, nc: Client
) -> None:
    called = await observed_calls(kmock, nats_proc.url, nc)
    assert ("apps", "deployments/scale", "patch") in called  # the scenario reached scaling
    forbidden = sorted(called - rendered_rules())
    assert not forbidden, f"the operator calls these but the ClusterRole denies them: {forbidden}"


async def test_no_rule_is_unused(kmock: Any, nats_proc: ServerProcess, nc: Client) -> None:
    called = await observed_calls(kmock, nats_proc.url, nc)
    granted = rendered_rules()
    # The exemption is for rules kopf needs outside this scenario; a stale one is an error.
    assert granted >= NAMESPACED_MODE_ONLY, sorted(NAMESPACED_MODE_ONLY - granted)
    assert granted >= ADMISSION_ONLY, sorted(ADMISSION_ONLY - granted)
    unused = sorted(granted - called - NAMESPACED_MODE_ONLY - ADMISSION_ONLY)
    assert not unused, f"the ClusterRole grants these but the operator never calls them: {unused}"
