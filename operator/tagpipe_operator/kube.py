"""The operator's Kubernetes client: lightkube, with retries and a call count.

Why lightkube: it is async, speaks server-side apply (PatchType.APPLY with a
field manager) and has typed models for every core kind, with one small
dependency tree (httpx); kubernetes_asyncio has no typed SSA call and kr8s
no typed models.

Writes to children are server-side applies by the field manager
`tagpipe-operator`, forced: the operator is the controller of what it renders,
and it names only the fields it owns, so a `kubectl rollout restart`
annotation or a webhook's field survives a converge. `spec.replicas` is never
in an apply (the scaler owns it through the `scale` subresource).

Every call made through `KubeClient.call` retries with jittered exponential
backoff (tenacity) on 429, 5xx, an optimistic-lock conflict (409 reason Conflict)
and transport errors; other errors (403, 404, 422, AlreadyExists) surface at once
for the caller to report. The Lease (leader.py) and the watches (cache.py) use
`api` directly: their own loops are the retry, on their own schedule.
"""

from __future__ import annotations

import base64
import datetime
import logging
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2
import kopf
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.core.resource import NamespacedResource
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import ConfigMap, Event, Secret, Service, ServiceAccount
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.types import PatchType
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)

__all__ = [
    "FIELD_MANAGER",
    "KINDS",
    "ApiError",
    "KubeClient",
    "describe_api",
    "reason",
    "status_code",
]

Obj = dict[str, Any]
T = TypeVar("T")
FIELD_MANAGER = "tagpipe-operator"

TagPipeline = create_namespaced_resource(
    "tagpipe.io", "v1alpha1", "TagPipeline", "tagpipelines", verbs=None
)

# kind -> lightkube resource; the only kinds the operator touches (rbac.py grants them).
KINDS: dict[str, type[NamespacedResource]] = {
    "Deployment": Deployment,
    "Service": Service,
    "ConfigMap": ConfigMap,
    "ServiceAccount": ServiceAccount,
    "PodDisruptionBudget": PodDisruptionBudget,
    "Secret": Secret,
    "TagPipeline": TagPipeline,
    "Event": Event,
    "Lease": Lease,
}
RETRY_STATUS = {429, 500, 502, 503, 504}


def as_dict(obj: Any) -> Obj:
    """A lightkube model as the plain dict the rest of the operator works on."""
    return dict(obj.to_dict())


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of an API error; None for anything else."""
    if isinstance(exc, httpx2.HTTPStatusError):  # ApiError is one
        return int(exc.response.status_code)
    return None


def reason(exc: BaseException) -> str:
    """The API's machine-readable reason (Forbidden, Conflict, ...), else the type name.

    lightkube makes an ApiError only of an exact `application/json` answer; any
    other error answer is read here the same way, from its Status body if any."""
    if isinstance(exc, ApiError) and exc.status.reason:
        return str(exc.status.reason)
    if isinstance(exc, httpx2.HTTPStatusError):
        return str(_status_body(exc).get("reason") or exc.response.reason_phrase or "HTTPError")
    return type(exc).__name__


def _status_body(exc: httpx2.HTTPStatusError) -> dict[str, Any]:
    try:
        body = exc.response.json()
    except Exception:  # not JSON: a proxy's page, say
        return {}
    return body if isinstance(body, dict) else {}


def describe_api(exc: BaseException) -> str:
    """One line for a log or a condition: the API's reason and message, never a traceback."""
    if isinstance(exc, httpx2.HTTPStatusError):
        message = _status_body(exc).get("message") or ""
        return f"{reason(exc)}: {message}".strip(": ")
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx2.TransportError):
        return True
    code = status_code(exc)
    return code in RETRY_STATUS or (code == 409 and reason(exc) == "Conflict")


def _b64(value: str | bytes) -> str:
    """kubeconfig `*-data` fields are base64. kopf keeps them as the kubeconfig had them
    (base64 already) or, from other logins, as PEM: encode only the latter."""
    raw = value.encode() if isinstance(value, str) else value
    if raw.lstrip().startswith(b"-----BEGIN"):
        return base64.b64encode(raw).decode()
    return raw.decode()


def kubeconfig_from(info: kopf.ConnectionInfo) -> KubeConfig:
    """kopf's login result as a lightkube config: one cluster, one user."""
    cluster: Obj = {"server": info.server}
    if info.insecure:
        cluster["insecure-skip-tls-verify"] = True
    if info.ca_path:
        cluster["certificate-authority"] = str(info.ca_path)
    if info.ca_data:
        cluster["certificate-authority-data"] = _b64(info.ca_data)
    user: Obj = {}
    if info.token:
        user["token"] = info.token
    if info.username:
        user.update(username=info.username, password=info.password)
    if info.certificate_path:
        user["client-certificate"] = str(info.certificate_path)
    if info.certificate_data:
        user["client-certificate-data"] = _b64(info.certificate_data)
    if info.private_key_path:
        user["client-key"] = str(info.private_key_path)
    if info.private_key_data:
        user["client-key-data"] = _b64(info.private_key_data)
    conf = {
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    return KubeConfig.from_dict(conf, fname=tempfile.gettempdir())


@dataclass
class KubeClient:
    api: AsyncClient
    attempts: int = 5

    @classmethod
    def from_connection(cls, info: kopf.ConnectionInfo, timeout_s: float = 30.0) -> KubeClient:
        return cls.from_config(kubeconfig_from(info), timeout_s)

    @classmethod
    def from_config(cls, config: KubeConfig, timeout_s: float = 30.0) -> KubeClient:
        api = AsyncClient(
            config, timeout=httpx2.Timeout(timeout_s), field_manager=FIELD_MANAGER, trust_env=False
        )
        return cls(api=api)

    async def close(self) -> None:
        await self.api.close()

    async def call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """`fn()` with backoff on what a retry can fix; each retry is logged as `what`."""

        def retrying_log(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info(
                "%s: attempt %d failed (%s), retrying",
                what,
                state.attempt_number,
                describe_api(exc) if exc else "?",
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception(_retryable),
            wait=wait_exponential_jitter(initial=0.2, max=5.0),
            stop=stop_after_attempt(self.attempts),
            before_sleep=retrying_log,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        """The object as a dict, or None when it does not exist."""
        res = KINDS[kind]
        try:
            got = await self.call(
                f"GET {kind}", lambda: self.api.get(res, name, namespace=namespace)
            )
        except httpx2.HTTPStatusError as exc:
            if status_code(exc) == 404:
                return None
            raise
        return as_dict(got)

    async def apply(self, obj: Obj) -> Obj:
        """Server-side apply of a rendered manifest (creates it when missing)."""
        kind, meta = obj["kind"], obj["metadata"]
        res = KINDS[kind]

        async def send() -> Any:
            return await self.api.patch(
                res,
                meta["name"],
                obj,
                namespace=meta["namespace"],
                patch_type=PatchType.APPLY,
                force=True,
            )

        return as_dict(await self.call(f"APPLY {kind}", send))

    async def set_replicas(self, namespace: str, name: str, replicas: int) -> None:
        """Through the `scale` subresource: the one write path for replicas."""
        body = {"spec": {"replicas": replicas}}
        await self.call(
            "PATCH Deployment/scale",
            lambda: self.api.patch(
                Deployment.Scale, name, body, namespace=namespace, patch_type=PatchType.MERGE
            ),
        )

    async def patch_status(self, namespace: str, name: str, status: Obj) -> None:
        body = {"status": status}
        await self.call(
            "PATCH TagPipeline/status",
            lambda: self.api.patch(
                TagPipeline.Status, name, body, namespace=namespace, patch_type=PatchType.MERGE
            ),
        )

    async def secret_value(self, namespace: str, name: str, key: str) -> str:
        secret = await self.get("Secret", namespace, name)
        data = (secret or {}).get("data") or {}
        if key not in data:
            raise LookupError(f"secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode()

    async def post_event(self, obj: Obj, type_: str, reason_: str, message: str) -> None:
        """A core/v1 Event about `obj` (kopf.event() needs kopf's task context;
        the scaling loop runs outside it)."""
        meta = obj["metadata"]
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        event = Event.from_dict(
            {
                # An explicit unique name, as kubectl/client-go do (name.<hex>).
                "metadata": {
                    "name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                    "namespace": meta["namespace"],
                },
                "involvedObject": {
                    "apiVersion": obj.get("apiVersion"),
                    "kind": obj.get("kind"),
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta.get("uid"),
                },
                "type": type_,
                "reason": reason_,
                "message": message[:1024],
                "source": {"component": FIELD_MANAGER},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
        )
        await self.call("POST Event", lambda: self.api.create(event))
