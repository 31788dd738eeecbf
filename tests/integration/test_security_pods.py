"""Every pod the operator renders runs locked down, whatever the spec asks for.

tests/unit/test_operator_render.py checks the three known Deployments of the
sample spec; this walks *every* rendered object that carries a pod template, for
several specs (a new child kind is covered without touching this file), and adds
what a pod must never get: host namespaces, privileged containers, hostPath
volumes, a service-account token (none of the services talk to the Kubernetes API).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tagpipe_operator.render import render
from tagpipe_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = yaml.safe_load((ROOT / "crds" / "examples" / "tagpipeline.yaml").read_text())["spec"]
MINIMAL = {
    "model": {"name": "m", "version": "1", "storageUri": "pvc://models/dir/m"},
    "nats": {"url": "nats://nats:4222"},
    "redis": {"url": "redis://redis:6379/0"},
}
CPU_ONLY = {**MINIMAL, "inference": {"gpu": 0}}
SPECS = {"sample": SAMPLE, "minimal": MINIMAL, "cpu-only": CPU_ONLY}


def pod_specs(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Pod specs anywhere in an object (Deployment, Job, CronJob, bare Pod...)."""
    if obj.get("kind") == "Pod":
        yield obj["spec"]
    stack: list[Any] = [obj.get("spec", {})]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "template" in node and isinstance(node["template"], dict):
                tpl_spec = node["template"].get("spec", {})
                if "containers" in tpl_spec:
                    yield tpl_spec
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def rendered(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(render("tp", "ns", "uid-1", parse_spec(spec)))


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_every_rendered_pod_is_locked_down(spec: dict[str, Any]) -> None:
    pods = [(o["kind"], o["metadata"]["name"], p) for o in rendered(spec) for p in pod_specs(o)]
    assert len(pods) >= 3  # gateway, downloader, inference at least
    for kind, name, p in pods:
        where = f"{kind}/{name}"
        assert p.get("automountServiceAccountToken") is False, where
        assert not (p.get("hostNetwork") or p.get("hostPID") or p.get("hostIPC")), where
        assert not [v for v in p.get("volumes", []) if "hostPath" in v], where
        psc = p["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc.get("runAsUser", 1000) != 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in p["containers"] + p.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc.get("privileged", False) is False, (where, c["name"])
            assert sc.get("runAsUser", 1000) != 0, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert not sc["capabilities"].get("add"), (where, c["name"])


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_no_secret_value_is_inlined_in_a_pod(spec: dict[str, Any]) -> None:
    """Credentials come by reference (secretKeyRef), never as a literal env value."""
    for obj in rendered(spec):
        for p in pod_specs(obj):
            for c in p["containers"]:
                for e in c.get("env", []):
                    secret = any(w in e["name"] for w in ("PASSWORD", "API_KEY", "TOKEN", "URL"))
                    if secret and not e["name"].endswith("_FILE"):
                        assert "value" not in e, (obj["metadata"]["name"], e["name"])
