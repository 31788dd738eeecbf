"""The tests' own plain-REST Kubernetes client on aiohttp (never the operator's).

The tests drive and inspect the cluster (or kmock) through it, independently of
the client the operator uses (lightkube, in tagpipe_operator.kube): a test that
read the world through the code under test could not catch that code's bugs.
It takes the credentials of a `kopf.ConnectionInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

Obj = dict[str, Any]

# kind -> (API path prefix, plural); the only kinds the operator touches.
KINDS: dict[str, tuple[str, str]] = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "Secret": ("/api/v1", "secrets"),
    "TagPipeline": ("/apis/tagpipe.io/v1alpha1", "tagpipelines"),
    "Event": ("/api/v1", "events"),
}

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:300]}")
        self.status = status


def path_for(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural = KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name is not None:
        path += f"/{name}"
    if sub is not None:
        path += f"/{sub}"
    return path


@dataclass
class KubeClient:
    session: aiohttp.ClientSession
    server: str

    @classmethod
    def from_connection(cls, info: kopf.ConnectionInfo, timeout_s: float = 30.0) -> KubeClient:
        connector = aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=16)
        session = aiohttp.ClientSession(
            connector=connector,
            headers=info.as_http_headers(),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )
        return cls(session=session, server=info.server.rstrip("/"))

    async def close(self) -> None:
        await self.session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Obj | list[Obj] | None = None,
        content_type: str | None = None,
    ) -> Obj:
        """Any API call; raises ApiError on 4xx/5xx. The typed helpers below build on it."""
        headers = {"Content-Type": content_type or "application/json"}
        async with self.session.request(
            method, self.server + path, json=body, headers=headers
        ) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, method, path, await resp.text())
            data = await resp.json(content_type=None)
            return data if isinstance(data, dict) else {}

    async def get(self, kind: str, namespace: str, name: str, sub: str | None = None) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path_for(kind, namespace, name, sub))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        return await self.request("POST", path_for(obj["kind"], meta["namespace"]), obj)

    async def patch(
        self, kind: str, namespace: str, name: str, body: Obj | list[Obj], sub: str | None = None
    ) -> Obj:
        """A merge patch (dict body) or a JSON patch (list of RFC 6902 operations)."""
        path = path_for(kind, namespace, name, sub)
        kind_of_patch = JSON_PATCH if isinstance(body, list) else MERGE_PATCH
        return await self.request("PATCH", path, body, kind_of_patch)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self.request("DELETE", path_for(kind, namespace, name))
        except ApiError as exc:
            if exc.status != 404:
                raise
