"""An informer cache of the operator's own children: list once, then watch.

A scaling tick reads a child's replicas, and drift correction checks that each
child exists, from here instead of a GET per object per tick. Only objects
carrying the operator's `managed-by` label are watched, so a same-named object
someone else made is never in the cache; `reconcile.apply_child` looks such a
name up with one GET before it writes (a miss is rare: a first create, drift).
Secrets are not cached: reading them stays a GET by name, which keeps the
operator's Secret access to the names its TagPipelines give.

A watch that breaks (timeout, 410 Gone, an API restart) is relisted after a
backoff; until a kind's first list has landed, `synced` is False and ticks wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightkube import ALL_NS

from tagpipe_operator.kube import KINDS, KubeClient, as_dict, describe_api
from tagpipe_operator.render import MANAGED_BY

log = logging.getLogger(__name__)

CHILD_KINDS = ("Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget")
LABELS: dict[str, Any] = {"app.kubernetes.io/managed-by": MANAGED_BY}
Key = tuple[str, str, str]


@dataclass
class ChildCache:
    namespace: str | None
    """The one watched namespace, or None for all of them."""
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    """(kind, namespace, name) -> the object as last seen."""
    ready: set[str] = field(default_factory=set)
    """Kinds whose first list has landed."""

    @property
    def synced(self) -> bool:
        return self.ready.issuperset(CHILD_KINDS)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))

    def tasks(self, client: Callable[[], KubeClient]) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self.follow(client, kind), name=f"tagpipe-cache-{kind}")
            for kind in CHILD_KINDS
        ]

    async def follow(
        self, client: Callable[[], KubeClient], kind: str, backoff_s: float = 1.0
    ) -> None:
        """Forever: list `kind`, then apply its watch events; relist on any break.

        `client()` is asked again for each list: a re-login (a rotated token) replaces
        the client, and a watch on the old one ends with an error."""
        while True:
            try:
                await self._list_and_watch(client(), kind)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an API restart or a 410: start over from a list
                log.info("%s watch ended (%s); relisting", kind, describe_api(exc))
            await asyncio.sleep(backoff_s)

    async def _list_and_watch(self, kube: KubeClient, kind: str) -> None:
        res, ns = KINDS[kind], self.namespace or ALL_NS
        listing = kube.api.list(res, namespace=ns, labels=LABELS)
        seen: dict[Key, dict[str, Any]] = {}
        async for obj in listing:
            seen[_key(kind, obj)] = as_dict(obj)
        for key in [k for k in self.objects if k[0] == kind]:
            if key not in seen:
                del self.objects[key]
        self.objects.update(seen)
        self.ready.add(kind)
        watch = kube.api.watch(
            res, namespace=ns, labels=LABELS, resource_version=listing.resourceVersion
        )
        async for event, obj in watch:
            key = _key(kind, obj)
            if event == "DELETED":
                self.objects.pop(key, None)
            elif event in ("ADDED", "MODIFIED"):
                self.objects[key] = as_dict(obj)


def _key(kind: str, obj: Any) -> Key:
    return (kind, str(obj.metadata.namespace), str(obj.metadata.name))
