"""RBAC: rbac.py is the one source; the generated YAML must match it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tagpipe_operator import rbac
from tagpipe_operator.kube import KINDS

ROOT = Path(__file__).resolve().parents[2]


def test_generated_yaml_equals_the_data() -> None:
    text = (ROOT / "operator" / "deploy" / "rbac.yaml").read_text()
    assert list(yaml.safe_load_all(text)) == rbac.manifests()
    assert text == rbac.render_yaml(), "regenerate: python -m tagpipe_operator.rbac"


def test_no_wildcards_and_no_deletes_of_children() -> None:
    for rule in rbac.RULES:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field]  # type: ignore[literal-required]
    # children are removed by owner-reference garbage collection, not by us
    assert not rbac.allows("apps", "deployments", "delete")
    assert not rbac.allows("", "secrets", "list")  # secrets: get by name only


# How the client touches kinds it does not read: Events are only ever posted, and the
# TagPipeline only has its status patched (kopf lists and watches it; nothing GETs it).
NOT_READ = {"Event": ("", "create"), "TagPipeline": ("/status", "patch")}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_the_client_uses_is_allowed(kind: str) -> None:
    prefix, plural = KINDS[kind]
    group = "" if prefix == "/api/v1" else prefix.split("/")[2]
    sub, verb = NOT_READ.get(kind, ("", "get"))
    assert rbac.allows(group, plural + sub, verb), kind


@pytest.mark.parametrize(
    ("group", "resource", "verb"),
    [
        # Found unused against kmock and absent from kopf 1.45's source for a real cluster.
        ("", "namespaces", "get"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "get"),
        ("apps", "deployments/scale", "get"),
        ("events.k8s.io", "events", "create"),
        ("tagpipe.io", "tagpipelines", "get"),
        ("tagpipe.io", "tagpipelines/status", "get"),
    ],
)
def test_trimmed_rules_stay_trimmed(group: str, resource: str, verb: str) -> None:
    assert not rbac.allows(group, resource, verb)


@pytest.mark.parametrize(
    ("group", "resource", "verb"),
    [
        ("apps", "deployments/scale", "patch"),
        ("apps", "deployments", "create"),
        ("apps", "deployments", "patch"),
        ("tagpipe.io", "tagpipelines", "watch"),
        ("tagpipe.io", "tagpipelines/status", "patch"),
        ("", "events", "create"),
        ("policy", "poddisruptionbudgets", "create"),
    ],
)
def test_the_calls_the_operator_makes_are_allowed(group: str, resource: str, verb: str) -> None:
    assert rbac.allows(group, resource, verb)
