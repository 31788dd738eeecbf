"""What the operator's kmock tests share: the API resources kmock serves, and lookups.

kmock is an in-memory Kubernetes API: it serves only the resources declared on it, and
keeps every object it was sent in `kmock.objects[resource, namespace, name]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from kmock import KubernetesEmulator

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


APPLY = "application/apply-patch+yaml"


class ApplyingEmulator(KubernetesEmulator):  # type: ignore[misc]
    """kmock has no server-side apply: it merges every PATCH as a plain dict, and a
    PATCH to a missing object is a 404. The API server creates the object from an
    apply; so does this emulator (select it with `pytest.mark.kmock(cls=...)`).
    Field ownership (what an apply removes, what it leaves to other managers) is
    NOT emulated: those tests run in `make e2e`."""

    async def _handle(self, request: Any) -> Any:
        if (
            request.action == self.action.UPDATE
            and request.subresource is None
            and APPLY in request.headers.get("Content-Type", "")
            and find_key(self, request.resource, request.namespace, request.name) is None
        ):
            request = attrs.evolve(request, action=self.action.CREATE)
        return await super()._handle(request)


def find_key(kmock: Any, resource: Any, namespace: str | None, name: str | None) -> Any:
    try:
        o = kmock.objects[resource, namespace, name]
    except KeyError:
        return None
    return None if o.deleted else o


def find(kmock: Any, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
    """The object as kmock holds it now; None if it was never created or is deleted."""
    try:
        o = kmock.objects[resource, namespace, name]
    except KeyError:
        return None
    return None if o.deleted else dict(o.raw)
