"""`helm upgrade` from the chart before issue 30 (commit OLD_CHART) to this one, alone.

The old chart shipped the CRD in `crds/`, which Helm installs once and never upgrades,
and had no `maxScaleUpStep` (removed for `scaleUpPolicies` without a deprecation).
After a plain `helm upgrade` the API server must serve this tree's CRD (applied by the
chart's hook), a TagPipeline written with the old field must be accepted and kept, and
the operator must work it, reading the field as its successor and saying so.

kubectl and helm only (no operator client code): what a user would run.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_helpers import ROOT, OperatorProcess, conditions, eventually, run, tool

# HEAD when issue 30 items 6-7 began: the last chart with the CRD in crds/.
OLD_CHART = "343c9ce7c05f51d07f6d08e851946032ba0c21ff"
CHART = str(ROOT / "charts" / "tagpipe")
CRD_FILE = ROOT / "crds" / "tagpipelines.tagpipe.io.yaml"
CRD_NAME = "tagpipelines.tagpipe.io"
STAGES = ("gateway", "downloader", "inference")
MAPPED = "read as scaleUpPolicies [{type: Pods, value: 2, periodSeconds: 5}]"


@pytest.fixture
def old_chart(tmp_path: Path) -> Path:
    """The chart as it was at OLD_CHART, with the files its symlinks point at."""
    archive = subprocess.run(
        ["git", "archive", OLD_CHART, "charts/tagpipe", "crds", "operator/deploy"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    return tmp_path / "charts" / "tagpipe"


@pytest.fixture
def release() -> Iterator[tuple[str, str]]:
    name, ns = f"up{uuid.uuid4().hex[:6]}", f"tagpipe-e2e-up-{uuid.uuid4().hex[:6]}"
    yield name, ns
    run("kubectl", "delete", "tagpipelines", "--all", "-n", ns, "--wait=false", check=False)
    run("helm", "uninstall", name, "-n", ns, check=False)
    run("kubectl", "delete", "namespace", ns, "--wait=false", check=False)


def get(*args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run("kubectl", "get", *args, "-o", "json"))
    return out


def autoscaling_fields(crd: dict[str, Any], stage: str) -> set[str]:
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return set(spec["properties"][stage]["properties"]["autoscaling"]["properties"])


def start_from_the_old_install() -> None:
    """No CRD, as on a cluster that never had tagpipe: the old chart then creates it the
    way it did for its users. The suite shares one API server, and an earlier test (or
    the chart its operator fixture installs) may have left this tree's CRD with other
    field managers. Deleting the CRD deletes every TagPipeline, so this runs only when
    all of them are the suite's (tagpipe-e2e-* namespaces); their finalizers go first,
    as no operator of an earlier test is left to remove them."""
    pipelines = get("tagpipelines", "-A").get("items", []) if _crd_exists() else []
    theirs = [
        f"{tp['metadata']['namespace']}/{tp['metadata']['name']}"
        for tp in pipelines
        if not tp["metadata"]["namespace"].startswith("tagpipe-e2e-")
    ]
    if theirs:  # a cluster in use (KUBECONFIG given): never delete what the suite did not make
        pytest.skip(f"deleting the CRD would delete TagPipelines outside the suite: {theirs}")
    for tp in pipelines:
        if tp["metadata"].get("finalizers"):
            meta = tp["metadata"]
            patch = json.dumps({"metadata": {"finalizers": None}})
            run("kubectl", "patch", "tp", meta["name"], "-n", meta["namespace"], "--type=merge",
                "-p", patch, check=False)  # fmt: skip
    run("kubectl", "delete", "crd", CRD_NAME, "--ignore-not-found", "--timeout=120s")


def _crd_exists() -> bool:
    return bool(run("kubectl", "get", "crd", CRD_NAME, "--ignore-not-found", "-o", "name").strip())


def pipeline(name: str, ns: str, nats_url: str, downloader: dict[str, Any]) -> str:
    body = {
        "apiVersion": "tagpipe.io/v1alpha1",
        "kind": "TagPipeline",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
            "nats": {"url": nats_url, "prefix": f"up{uuid.uuid4().hex[:6]}"},
            "redis": {"url": "redis://redis:6379/0"},
            "inference": {"gpu": 0},
            "downloader": downloader,
            "deletionPolicy": "Retain",
        },
    }
    return json.dumps(body)


def applies(manifest: str) -> bool:
    """kubectl apply, judged by the API server alone; False while the server is not ready
    for it (a CRD just made). --validate=false: kubectl's own schema check reads the
    OpenAPI the server publishes, which trails a CRD change by up to minutes on a busy
    1.24 server. What the server stores is the answer: pruned (old schema) or kept."""
    proc = subprocess.run(
        [tool("kubectl"), "apply", "--validate=false", "-f", "-"],
        input=manifest,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode == 0


def keeps_the_old_field(ns: str) -> bool:
    return downloader_autoscaling(ns, "legacy").get("maxScaleUpStep") == 2


def downloader_autoscaling(ns: str, name: str) -> dict[str, Any]:
    spec = get("tp", name, "-n", ns)["spec"]
    return dict(spec.get("downloader", {}).get("autoscaling") or {})


def spec_differences(want: Any, got: Any, at: str = "spec") -> list[str]:
    """Where the stored CRD differs from the file (keys the server adds are allowed)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [at]
        return [d for k, v in want.items() for d in spec_differences(v, got.get(k), f"{at}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [at]
        pairs = zip(want, got, strict=True)
        return [d for i, (w, g) in enumerate(pairs) for d in spec_differences(w, g, f"{at}[{i}]")]
    return [] if want == got else [at]


async def test_helm_upgrade_alone_upgrades_the_crd_and_keeps_the_old_field_working(
    old_chart: Path,
    release: tuple[str, str],
    nats_url: str,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    name, ns = release
    start_from_the_old_install()
    run("helm", "install", name, str(old_chart), "-n", ns, "--create-namespace")
    old = get("crd", CRD_NAME)
    assert all("maxScaleUpStep" not in autoscaling_fields(old, s) for s in STAGES)
    assert "helm.sh/hook" not in (old["metadata"].get("annotations") or {})
    # Before: a pipeline that keeps running across the upgrade; the old field dropped.
    await eventually(lambda: applies(pipeline("kept", ns, nats_url, {})), within=60)
    kept_uid = get("tp", "kept", "-n", ns)["metadata"]["uid"]
    legacy = pipeline("legacy", ns, nats_url, {"autoscaling": {"maxScaleUpStep": 2}})
    assert await eventually(lambda: applies(legacy), within=60)
    assert "maxScaleUpStep" not in downloader_autoscaling(ns, "legacy"), "the old CRD prunes it"

    run("helm", "upgrade", name, CHART, "-n", ns)  # no flags, no kubectl apply of crds/

    new = get("crd", CRD_NAME)
    want = yaml.safe_load(CRD_FILE.read_text())
    assert spec_differences(want["spec"], new["spec"]) == []
    assert new["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert all("maxScaleUpStep" in autoscaling_fields(new, s) for s in STAGES)
    assert get("tp", "kept", "-n", ns)["metadata"]["uid"] == kept_uid

    # After: the old field is accepted and stored; the operator works the pipeline,
    # reads the field as a Pods policy and says so in a condition and an Event.
    # Applied again until the server's handler has the new schema (a moment after the CRD).
    await eventually(lambda: applies(legacy) and keeps_the_old_field(ns), within=60)
    stored = get("tp", "legacy", "-n", ns)
    assert stored["spec"]["downloader"]["autoscaling"]["maxScaleUpStep"] == 2
    start_operator(ns)

    def deprecated() -> dict[str, Any] | None:
        found = [c for c in conditions(get("tp", "legacy", "-n", ns)) if c["type"] == "Deprecated"]
        return found[0] if found and found[0]["status"] == "True" else None

    cond = await eventually(deprecated, within=90)
    assert "spec.downloader.autoscaling.maxScaleUpStep is deprecated" in cond["message"]
    assert MAPPED in cond["message"]
    await eventually(lambda: _children(ns, stored["metadata"]["uid"]) == set(STAGES), within=90)
    events = get("events", "-n", ns, "--field-selector", "involvedObject.name=legacy")["items"]
    warned = [e for e in events if e.get("reason") == "Deprecated" and e.get("type") == "Warning"]
    assert warned and MAPPED in warned[0]["message"]
    # The pipeline without the old field carries no warning.
    kept = [c for c in conditions(get("tp", "kept", "-n", ns)) if c["type"] == "Deprecated"]
    assert all(c["status"] == "False" for c in kept)

    run("helm", "uninstall", name, "-n", ns)
    assert _crd_exists(), "uninstalling the chart must keep the CRD (and every TagPipeline)"


def _children(ns: str, owner_uid: str) -> set[str]:
    """The stages whose Deployment this TagPipeline owns."""
    out = set()
    for dep in get("deployments", "-n", ns)["items"]:
        owners = dep["metadata"].get("ownerReferences") or []
        if any(o.get("uid") == owner_uid for o in owners):
            labels = dep["metadata"].get("labels") or {}
            out.add(labels.get("app.kubernetes.io/component", ""))
    return out
