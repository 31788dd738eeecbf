"""The README's Kubernetes quick start, run as written, on the real control plane.

The commands are read out of README.md (the bash block after QUICKSTART_MARK), so the
README cannot drift from what is tested. They run with bash from the repository root,
with `make tools`' helm and kubectl first on PATH. Two stand-ins make up for what this
control plane lacks (no kubelet, so no pod ever runs):

* the chart's model-seed Job is a hook helm waits for; a thread marks each Job in the
  namespace Complete, which is what a kubelet running its pod would lead to;
* the operator runs as a process, with the token of the ServiceAccount the quick start's
  release created (so with exactly the RBAC it grants), watching the quick start's
  namespace, as the chart's operator Deployment would.

Then every Secret, ConfigMap, PVC and ServiceAccount that the rendered pods (the
Deployments' templates, and the Pods the controller manager made from them) reference
must exist.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import ROOT, OperatorProcess, admin_kubeconfig, run, token_kubeconfig

QUICKSTART_MARK = "<!-- quickstart-k8s: e2e/test_quickstart_e2e.py runs this block -->"
NAMESPACE = "tagpipe"
RELEASE = "tagpipe"
OPERATOR_SA = "tagpipe-operator"


def quickstart_script() -> str:
    """The bash block right after the mark in README.md."""
    readme = (ROOT / "README.md").read_text()
    assert QUICKSTART_MARK in readme, "README.md lost the quick start's mark"
    after = readme.split(QUICKSTART_MARK, 1)[1]
    block = re.match(r"\s*```bash\n(.*?)\n```", after, re.S)
    assert block, "no ```bash block right after the quick start's mark"
    return block.group(1)


class StandInKubelet(threading.Thread):
    """Marks every Job of a namespace Complete, as its pod would have made it."""

    def __init__(self, namespace: str) -> None:
        super().__init__(daemon=True)
        self.namespace = namespace
        self.stopped = threading.Event()
        self.completed: set[str] = set()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            out = run("kubectl", "-n", self.namespace, "get", "jobs", "-o", "json", check=False)
            for job in json.loads(out or '{"items": []}')["items"]:
                if not _finished(job):
                    self._complete(job["metadata"]["name"])

    def _complete(self, name: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        done = {"type": "Complete", "status": "True"}
        status = {"startTime": now, "completionTime": now, "succeeded": 1}
        status["conditions"] = [{**done, "lastProbeTime": now, "lastTransitionTime": now}]
        args = ["-n", self.namespace, "patch", "job", name, "--subresource=status"]
        patch = json.dumps({"status": status})
        if run("kubectl", *args, "--type=merge", "-p", patch, check=False):
            self.completed.add(name)


def _finished(job: dict[str, Any]) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in conditions)


def _get(kind: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        run("kubectl", "-n", NAMESPACE, "get", kind, "-o", "json")
    )["items"]
    return items


def references(pod_spec: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, name) of every Secret, ConfigMap, PVC and ServiceAccount a pod spec uses."""
    refs = {("serviceaccount", pod_spec.get("serviceAccountName") or "default")}
    refs |= {("secret", s["name"]) for s in pod_spec.get("imagePullSecrets") or []}
    for vol in pod_spec.get("volumes") or []:
        if "secret" in vol:
            refs.add(("secret", vol["secret"]["secretName"]))
        if "configMap" in vol:
            refs.add(("configmap", vol["configMap"]["name"]))
        if "persistentVolumeClaim" in vol:
            refs.add(("pvc", vol["persistentVolumeClaim"]["claimName"]))
        for src in (vol.get("projected") or {}).get("sources") or []:
            refs |= {(k.lower(), src[k]["name"]) for k in ("secret", "configMap") if k in src}
    for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        for src in c.get("envFrom") or []:
            refs |= {(k[:-3].lower(), src[k]["name"]) for k in src if k.endswith("Ref")}
        for env in c.get("env") or []:
            ref = env.get("valueFrom") or {}
            refs |= {(k[:-6].lower(), ref[k]["name"]) for k in ref if k.endswith("KeyRef")}
    return refs


def _exists(kind: str, name: str) -> bool:
    where = ["-n", NAMESPACE, "--ignore-not-found", "-o", "name"]
    return bool(run("kubectl", "get", kind, name, *where).strip())


def _token(namespace: str, sa: str, within: float = 30.0) -> str:
    deadline = time.monotonic() + within
    while True:
        out = run("kubectl", "-n", namespace, "create", "token", sa, check=False).strip()
        if out or time.monotonic() > deadline:
            assert out, f"no token for {namespace}/{sa} within {within}s"
            return out
        time.sleep(1)


@pytest.fixture
def quickstart_namespace() -> Iterator[str]:
    """The quick start's fixed namespace; whatever it installed goes at the end.

    A cluster that already has that namespace (the kind workflow installs its own release
    `tagpipe` there) is left alone: the quick start runs where it can start from nothing,
    as on `make e2e`'s own control plane.
    """
    if run("kubectl", "get", "namespace", NAMESPACE, "--ignore-not-found", "-o", "name").strip():
        pytest.skip(f"namespace {NAMESPACE} exists: the quick start needs a cluster without it")
    yield NAMESPACE
    run("helm", "uninstall", RELEASE, "-n", NAMESPACE, check=False)
    for tp in run("kubectl", "-n", NAMESPACE, "get", "tp", "-o", "name", check=False).split():
        patch = '{"metadata": {"finalizers": null}}'
        run("kubectl", "-n", NAMESPACE, "patch", tp, "--type=merge", "-p", patch, check=False)
    run("kubectl", "delete", "namespace", NAMESPACE, "--wait=false", check=False)


def run_quickstart(script: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{ROOT / '.bin'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _deployments_rendered(within: float = 90.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while True:
        deps = [d for d in _get("deployments") if "tagpipe.io/config-checksum" in _annotations(d)]
        if len(deps) >= 3 or time.monotonic() > deadline:
            return deps
        time.sleep(1)


def _annotations(dep: dict[str, Any]) -> dict[str, str]:
    meta = dep["spec"]["template"].get("metadata") or {}
    return dict(meta.get("annotations") or {})


def test_the_readme_quick_start_creates_what_its_pods_reference(
    quickstart_namespace: str, run_dir: Path
) -> None:
    script = quickstart_script()
    assert f"-n {quickstart_namespace}" in script, "the quick start moved to another namespace"
    kubelet = StandInKubelet(quickstart_namespace)
    kubelet.start()
    try:
        done = run_quickstart(script)
    finally:
        kubelet.stopped.set()
        kubelet.join()
    assert done.returncode == 0, f"quick start failed:\n{done.stdout}\n{done.stderr}"
    assert kubelet.completed, "the quick start ran no model-seed Job"
    assert "photos" in done.stdout  # its last command lists the sample TagPipeline

    token = _token(quickstart_namespace, OPERATOR_SA)
    kubeconfig = token_kubeconfig(admin_kubeconfig(), token, run_dir / "quickstart.kubeconfig")
    log = run_dir / "operator-quickstart.log"
    settings = {"TAGPIPE_NATS_TIMEOUT_S": "1", "TAGPIPE_CONVERGE_RETRY_S": "2"}
    operator = OperatorProcess(kubeconfig, quickstart_namespace, log, settings).start()
    try:
        deployments = _deployments_rendered()
    finally:
        operator.stop()
    names = sorted(d["metadata"]["name"] for d in deployments)
    assert names == ["photos-downloader", "photos-gateway", "photos-inference"], operator.tail()
    assert not operator.forbidden(), operator.forbidden()[:5]

    pod_specs = [d["spec"]["template"]["spec"] for d in deployments]
    pod_specs += [p["spec"] for p in _get("pods")]  # the controller manager's, if any
    wanted = set().union(*(references(spec) for spec in pod_specs))
    assert {k for k, _ in wanted} >= {"secret", "configmap", "pvc", "serviceaccount"}, wanted
    missing = sorted(ref for ref in wanted if not _exists(*ref))
    assert missing == [], f"referenced by the quick start's pods but never created: {missing}"
