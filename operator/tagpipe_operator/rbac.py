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


# Each rule is one the operator (or kopf on its behalf) was observed to call against
# kmock (tests/integration/test_rbac_matches_operator.py), checked against kopf 1.45's
# source for what a real cluster adds. Verbs deliberately absent: kopf never GETs a
# single object (it lists+watches, then PATCHes), never GETs a CRD by name (it reads
# discovery and lists+watches CRDs), and posts core/v1 Events only; the scaler PATCHes
# /scale blind and reads replicas from the Deployment itself.
CHILDREN_VERBS = ["get", "list", "watch", "create", "patch"]

RULES: list[Rule] = [
    # kopf: list+watch the CR; patch finalizers and its progress annotations.
    {
        "apiGroups": ["tagpipe.io"],
        "resources": ["tagpipelines"],
        "verbs": ["list", "watch", "patch"],
    },
    # kopf: the CRD has a status subresource, so status goes through /status (PATCH only).
    {"apiGroups": ["tagpipe.io"], "resources": ["tagpipelines/status"], "verbs": ["patch"]},
    # Never called: the OwnerReferencesPermissionEnforcement admission plugin (OpenShift
    # enables it) refuses a child whose ownerReference sets blockOwnerDeletion unless
    # its creator may update the owner's finalizers.
    {"apiGroups": ["tagpipe.io"], "resources": ["tagpipelines/finalizers"], "verbs": ["update"]},
    # kopf: resource_observer lists+watches CRDs to notice CRDs added or removed at runtime.
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
    # kopf: namespace_observer lists+watches namespaces only when the operator watches
    # one namespace (TAGPIPE_NAMESPACE). Not observable in the kmock test (the chart runs
    # cluster-wide, and kmock cannot serve /api/v1/namespaces), hence its exemption there.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    # kopf.event() and the scaler's Events: core/v1 only (kopf's EVENTS backbone).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # Children: list+watch feed the informer cache (cache.py); get looks up a name the
    # cache does not hold (no take-overs); patch is server-side apply, and create is
    # what the API server also checks when an apply creates. Deletion is left to
    # owner-reference garbage collection: no delete.
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": CHILDREN_VERBS},
    # The scaler's single write path for replicas.
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["patch"]},
    {
        "apiGroups": [""],
        "resources": ["services", "configmaps", "serviceaccounts"],
        "verbs": CHILDREN_VERBS,
    },
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": CHILDREN_VERBS},
]

# Leader election (leader.py): the Lease in the operator's own namespace only (a Role).
LEASE_RULES: list[Rule] = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "patch"],
    },
]

# NATS URLs with credentials (spec.nats.credentialsSecretRef): read only, by name, and
# never cluster-wide. This ClusterRole is bound by RoleBindings, one per namespace the
# chart's `operator.secretNamespaces` names (and the release namespace): the operator
# reads Secrets there and nowhere else.
SECRET_RULES: list[Rule] = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]

NAME = "tagpipe-operator"


def allows(api_group: str, resource: str, verb: str, rules: list[Rule] = RULES) -> bool:
    """Whether `rules` grant `verb` on `resource` (e.g. "deployments/scale") in `api_group`."""
    return any(
        api_group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
        for r in rules
    )


BIND_ANNOTATION = "tagpipe.io/bind"
"""On a ClusterRole: `per-namespace` binds it by a RoleBinding in each listed namespace."""


def manifests() -> list[dict[str, Any]]:
    """The operator's roles, each with its binding to the operator's ServiceAccount."""
    sa = [{"kind": "ServiceAccount", "name": NAME, "namespace": "tagpipe-system"}]
    api = "rbac.authorization.k8s.io"
    secrets_role = f"{NAME}-secrets"
    return [
        {
            "apiVersion": f"{api}/v1",
            "kind": "ClusterRole",
            "metadata": {"name": NAME},
            "rules": [dict(r) for r in RULES],
        },
        {
            "apiVersion": f"{api}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": NAME},
            "roleRef": {"apiGroup": api, "kind": "ClusterRole", "name": NAME},
            "subjects": sa,
        },
        {
            "apiVersion": f"{api}/v1",
            "kind": "Role",
            "metadata": {"name": f"{NAME}-leader", "namespace": "tagpipe-system"},
            "rules": [dict(r) for r in LEASE_RULES],
        },
        {
            "apiVersion": f"{api}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"{NAME}-leader", "namespace": "tagpipe-system"},
            "roleRef": {"apiGroup": api, "kind": "Role", "name": f"{NAME}-leader"},
            "subjects": sa,
        },
        {
            "apiVersion": f"{api}/v1",
            "kind": "ClusterRole",
            "metadata": {"name": secrets_role, "annotations": {BIND_ANNOTATION: "per-namespace"}},
            "rules": [dict(r) for r in SECRET_RULES],
        },
        {
            "apiVersion": f"{api}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": secrets_role, "namespace": "tagpipe-system"},
            "roleRef": {"apiGroup": api, "kind": "ClusterRole", "name": secrets_role},
            "subjects": sa,
        },
    ]


def render_yaml() -> str:
    header = "# Generated from tagpipe_operator/rbac.py; do not edit by hand.\n"
    return header + yaml.safe_dump_all(manifests(), sort_keys=False)


if __name__ == "__main__":
    sys.stdout.write(render_yaml())
