"""The chart, the CRD and the sample against a real API server, as a user meets them:
helm install/test/upgrade/uninstall, kubectl apply, get and explain.

No pod runs (no kubelet): these tests read what the server accepted and stored.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import yaml
from e2e_helpers import ROOT, OperatorProcess, eventually, run

from tests.kube_rest import KubeClient

CHART = str(ROOT / "charts" / "tagpipe")
EXAMPLE = ROOT / "crds" / "examples" / "tagpipeline.yaml"
CRD_FILE = ROOT / "crds" / "tagpipelines.tagpipe.io.yaml"


@pytest.fixture
def release() -> Iterator[tuple[str, str]]:
    """A unique (release, namespace); whatever the test left installed is removed."""
    name, ns = f"ch{uuid.uuid4().hex[:6]}", f"tagpipe-e2e-ch-{uuid.uuid4().hex[:6]}"
    yield name, ns
    run("helm", "uninstall", name, "-n", ns, check=False)
    run("kubectl", "delete", "namespace", ns, "--wait=false", check=False)


def installed(name: str, ns: str) -> list[str]:
    """kind/name of every object in the release's manifest that the server does not have."""
    manifest = run("helm", "get", "manifest", name, "-n", ns)
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    assert docs, "empty release manifest"
    missing = []
    for doc in docs:
        ref = f"{doc['kind']}/{doc['metadata']['name']}"
        where = ["-n", doc["metadata"].get("namespace", ns)]
        if not run("kubectl", "get", ref, *where, "--ignore-not-found", "-o", "name").strip():
            missing.append(ref)
    return missing


def server_dry_run(manifest: str) -> None:
    """The server's admission and schema checks on objects that cannot really run here.

    An apply, not a create: the hooks include the CRD, which exists once any release
    (or the suite's `crd` fixture) has applied it.
    """
    run(
        "kubectl", "apply", "--server-side", "--force-conflicts", "--dry-run=server",
        "-o", "name", "-f", "-", stdin=manifest,
    )  # fmt: skip


def test_default_values_install_test_upgrade_uninstall(release: tuple[str, str]) -> None:
    name, ns = release
    run("helm", "install", name, CHART, "-n", ns, "--create-namespace")
    assert installed(name, ns) == []
    operator = f"{name}-tagpipe-operator"
    sa = json.loads(run("kubectl", "get", "clusterrolebinding", operator, "-o", "json"))
    assert sa["subjects"] == [{"kind": "ServiceAccount", "name": operator, "namespace": ns}]

    # `helm test` creates its Pod; with no kubelet it never runs, so helm gives up.
    hooks = run("helm", "get", "hooks", name, "-n", ns)
    server_dry_run(hooks)
    run("helm", "test", name, "-n", ns, "--timeout", "3s", check=False)
    pod = run("kubectl", "get", "pod", f"{name}-tagpipe-test-readyz", "-n", ns, "-o", "json")
    test_pod = json.loads(pod)
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"

    # An upgrade reaches the objects: the config changes and the pod template follows it.
    before = _deployment(ns, operator)
    run("helm", "upgrade", name, CHART, "-n", ns, "--set", "operator.logLevel=DEBUG")
    config = json.loads(
        run("kubectl", "get", "cm", f"{name}-tagpipe-config", "-n", ns, "-o", "json")
    )
    assert config["data"]["TAGPIPE_LOG_LEVEL"] == "DEBUG"
    after = _deployment(ns, operator)
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    assert _checksum(after) != _checksum(before)
    assert installed(name, ns) == []

    run("helm", "uninstall", name, "-n", ns)
    assert not run(
        "kubectl",
        "get",
        "deploy,sa,cm,svc",
        "-n",
        ns,
        "-l",
        f"app.kubernetes.io/instance={name}",
        "-o",
        "name",
    ).strip()
    assert not run(
        "kubectl", "get", "clusterrole", operator, "--ignore-not-found", "-o", "name"
    ).strip()


def _deployment(ns: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run("kubectl", "get", "deploy", name, "-n", ns, "-o", "json"))
    return out


def _checksum(dep: dict[str, Any]) -> str:
    return str(dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"])


def test_ci_values_install(release: tuple[str, str]) -> None:
    """The CI values: bundled NATS and Redis, the model store, a sized-down example.

    --no-hooks: the model-seed Job is a pre-install hook that waits for a pod to finish;
    the hooks go through the server's dry run instead.
    """
    name, ns = release
    values = str(ROOT / "charts" / "tagpipe" / "ci" / "kind-values.yaml")
    run("helm", "install", name, CHART, "-n", ns, "--create-namespace", "-f", values, "--no-hooks")
    assert installed(name, ns) == []
    server_dry_run(run("helm", "get", "hooks", name, "-n", ns))
    kinds = run("kubectl", "get", "statefulsets,tagpipelines", "-n", ns, "-o", "name").split()
    assert f"statefulset.apps/{name}-tagpipe-nats" in kinds
    assert f"statefulset.apps/{name}-tagpipe-redis" in kinds
    assert "tagpipeline.tagpipe.io/ci" in kinds
    run("helm", "uninstall", name, "-n", ns)


def _subset(want: Any, got: Any, at: str = "spec") -> list[str]:
    """Where `got` differs from `want` (keys the server adds, such as defaults, are allowed)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [at]
        return [d for k, v in want.items() for d in _subset(v, got.get(k), f"{at}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [at]
        return [
            d
            for i, (w, g) in enumerate(zip(want, got, strict=True))
            for d in _subset(w, g, f"{at}[{i}]")
        ]
    return [] if want == got else [at]


async def test_the_server_stores_the_crd_from_crds(kube: KubeClient, crd: dict[str, Any]) -> None:
    want = yaml.safe_load(CRD_FILE.read_text())
    stored = await kube.request(
        "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{want['metadata']['name']}"
    )
    assert _subset(want["spec"], stored["spec"]) == []


def test_kubectl_explain_prints_the_field_descriptions(crd: dict[str, Any]) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    inference = schema["properties"]["spec"]["properties"]["inference"]
    out = " ".join(run("kubectl", "explain", "tagpipeline.spec.inference").split())
    for field, prop in inference["properties"].items():
        assert re.search(rf"\b{field}\b", out), field
        if "description" in prop:  # kubectl re-wraps the text: compare word by word
            assert " ".join(prop["description"].split()[:8]) in out, field


def _secret(name: str, key: str, value: str) -> dict[str, Any]:
    data = {key: base64.b64encode(value.encode()).decode()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "data": data,
    }


async def test_the_example_applies_unchanged_and_kubectl_get_shows_the_columns(
    kube: KubeClient,
    crd: dict[str, Any],
    nats_url: str,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    ns, name = example["metadata"]["namespace"], example["metadata"]["name"]
    secrets = [
        _secret("tagpipe-nats", "url", nats_url),
        _secret("tagpipe-redis", "url", "redis://redis.redis.svc:6379/0"),
        _secret("tagpipe-api-keys", "keys", f"e2e-{uuid.uuid4().hex}"),
    ]
    run("kubectl", "apply", "-f", "-", stdin="\n---\n".join(json.dumps(s) for s in secrets))
    start_operator(ns)
    try:
        run("kubectl", "apply", "-f", str(EXAMPLE))
        await eventually(partial(_status_written, kube, ns, name))
        # The columns show the status (read around the same tick: retried if it moved).
        shown = await eventually(partial(_columns_match_status, kube, ns, name))
        assert shown[0] == ["NAME", "READY", "BACKLOG", "DOWNLOADERS", "INFERENCE", "AGE"]
    finally:
        run("kubectl", "delete", "-f", str(EXAMPLE), "--ignore-not-found", check=False)
        for s in secrets:
            run(
                "kubectl",
                "delete",
                "secret",
                s["metadata"]["name"],
                "-n",
                ns,
                "--ignore-not-found",
                check=False,
            )


async def _columns_match_status(kube: KubeClient, ns: str, name: str) -> list[list[str]] | None:
    header, row = (
        line.split() for line in run("kubectl", "get", "tp", name, "-n", ns).splitlines()
    )
    status = await _status_written(kube, ns, name) or {}
    ready = next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), None)
    expected = [
        name,
        ready,
        str(status.get("backlog")),
        status.get("downloaders"),
        status.get("inference"),
    ]
    return [header, row] if row[:5] == expected else None


async def _status_written(kube: KubeClient, ns: str, name: str) -> dict[str, Any] | None:
    tp = await kube.get("TagPipeline", ns, name)
    status = (tp or {}).get("status") or {}
    return status if status.get("conditions") and status.get("backlog") is not None else None
