"""What the operator's kmock tests share: the API resources kmock serves, and lookups.

kmock is an in-memory Kubernetes API: it serves only the resources declared on it, and
keeps every object it was sent in `kmock.objects[resource, namespace, name]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Each resource the operator touches: "group/version/plural" -> (kind, namespaced, subresources).
RESOURCES: dict[str, tuple[str, bool, list[str]]] = {
    "tagpipe.io/v1alpha1/tagpipelines": ("TagPipeline", True, ["status"]),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, []),
    "v1/namespaces": ("Namespace", False, []),
    "v1/events": ("Event", True, []),
    "v1/services": ("Service", True, []),
    "v1/configmaps": ("ConfigMap", True, []),
    "v1/serviceaccounts": ("ServiceAccount", True, []),
    "v1/secrets": ("Secret", True, []),
    "apps/v1/deployments": ("Deployment", True, ["scale"]),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, []),
}


def serve(kmock: Any, resources: Mapping[str, tuple[str, bool, list[str]]] = RESOURCES) -> None:
    """Declare `resources` on kmock, with every verb, so discovery and CRUD answer."""
    for key, (kind, namespaced, subs) in resources.items():
        info = kmock.resources[key]
        info.kind, info.namespaced, info.subresources = kind, namespaced, set(subs)
        info.verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}


def find(kmock: Any, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
    """The object as kmock holds it now; None if it was never created or is deleted."""
    try:
        o = kmock.objects[resource, namespace, name]
    except KeyError:
        return None
    return None if o.deleted else dict(o.raw)
