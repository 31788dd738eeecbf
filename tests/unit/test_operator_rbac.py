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
    # Secrets: get by name only, and never in the cluster-wide role (per-namespace bindings).
    assert not rbac.allows("", "secrets", "get")
    assert rbac.allows("", "secrets", "get", rbac.SECRET_RULES)
    assert not rbac.allows("", "secrets", "list", rbac.SECRET_RULES)


def test_the_owner_references_admission_plugin_is_satisfied() -> None:
    """OwnerReferencesPermissionEnforcement: blockOwnerDeletion needs this."""
    assert rbac.allows("tagpipe.io", "tagpipelines/finalizers", "update")


def test_secret_reads_are_bound_per_namespace_never_cluster_wide() -> None:
    docs = rbac.manifests()
    secrets_role = next(d for d in docs if d["metadata"]["name"].endswith("-secrets"))
    assert secrets_role["metadata"]["annotations"][rbac.BIND_ANNOTATION] == "per-namespace"
    cluster_bound = {d["roleRef"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"}
    assert secrets_role["metadata"]["name"] not in cluster_bound


# How the client touches kinds it does not read: Events are only ever posted, and the
# TagPipeline only has its status patched (kopf lists and watches it; nothing GETs it).
NOT_READ = {"Event": ("", "create"), "TagPipeline": ("/status", "patch")}
RULES_OF = {"Secret": rbac.SECRET_RULES, "Lease": rbac.LEASE_RULES}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_the_client_uses_is_allowed(kind: str) -> None:
    info = KINDS[kind]._api_info
    group, plural = info.resource.group, info.plural
    sub, verb = NOT_READ.get(kind, ("", "get"))
    assert rbac.allows(group, plural + sub, verb, RULES_OF.get(kind, rbac.RULES)), kind


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
