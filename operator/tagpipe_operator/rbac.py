"""The operator's least-privilege RBAC rules, as data.

This list is the single source: `operator/deploy/rbac.yaml` is generated from it
(`python -m tagpipe_operator.rbac > operator/deploy/rbac.yaml`, checked by a
unit test) and the Helm chart's ClusterRole renders from it. Each rule names
why it exists; nothing here is `*`.
"""

from __future__ import annotations

import sys
from typing import Any, TypedDict

import yaml


class Rule(TypedDict):
    apiGroups: list[str]
    resources: list[str]
    verbs: list[str]


RULES: list[Rule] = [
    # kopf: watch the CR, patch its status and finalizers/annotations (progress records).
    {
        "apiGroups": ["tagpipe.io"],
        "resources": ["tagpipelines"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {"apiGroups": ["tagpipe.io"], "resources": ["tagpipelines/status"], "verbs": ["get", "patch"]},
    # kopf: discover that the CRD exists and is served.
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
    # kopf: cluster-wide watching lists namespaces.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    # kopf.event(): one Event per scale decision and per error.
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    # Children: converge (get/create/patch), drift correction (get). Deletion is left to
    # owner-reference garbage collection, so no delete verb.
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "create", "patch"]},
    # The scaler's single write path for replicas.
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
    {
        "apiGroups": [""],
        "resources": ["services", "configmaps", "serviceaccounts"],
        "verbs": ["get", "create", "patch"],
    },
    {
        "apiGroups": ["policy"],
        "resources": ["poddisruptionbudgets"],
        "verbs": ["get", "create", "patch"],
    },
    # NATS URLs with credentials (spec.nats.credentialsSecretRef): read only, by name.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
]

NAME = "tagpipe-operator"


def allows(api_group: str, resource: str, verb: str) -> bool:
    """Whether RULES grant `verb` on `resource` (e.g. "deployments/scale") in `api_group`."""
    return any(
        api_group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
        for r in RULES
    )


def manifests() -> list[dict[str, Any]]:
    """The ClusterRole and its binding to the operator's ServiceAccount."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": NAME},
        "rules": [dict(r) for r in RULES],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": NAME},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": "tagpipe-system"}],
    }
    return [role, binding]


def render_yaml() -> str:
    header = "# Generated from tagpipe_operator/rbac.py; do not edit by hand.\n"
    return header + yaml.safe_dump_all(manifests(), sort_keys=False)


if __name__ == "__main__":
    sys.stdout.write(render_yaml())
