"""kopf handlers: thin, typed, and registered by `register()` onto a registry.

Registration is a function, not import-time decorators, so the timer interval
and the login come from settings built in `main()` (or a test), never from the
environment at import time.

* create/update/resume: converge children (server-side apply, children.py) and
  ensure streams; a child that fails is named in an Event and the handler retries
  with a doubling delay; a NATS that does not answer leaves the streams to the
  scaling loop's next tick. They run only on the Lease holder (__main__.py).
* index + one background loop (`loop.py`, every `scale_interval_s`): recreate
  missing children, read backlogs, decide and apply replicas, write status.
  Not a kopf timer: timers force a finalizer onto every object.
* delete: children go by owner-reference garbage collection; streams are
  removed only under `deletionPolicy: Delete`, and only that case carries a
  finalizer, released after bounded retries even when NATS is gone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from pydantic import ValidationError

from tagpipe_operator import loop, reconcile
from tagpipe_operator.children import Applied, flow_refusals
from tagpipe_operator.children import converge as converge_children
from tagpipe_operator.leader import LeaderElector
from tagpipe_operator.reconcile import Runtime
from tagpipe_operator.render import MAX_NAME
from tagpipe_operator.settings import OperatorSettings
from tagpipe_operator.spec import TagPipelineSpec, parse_spec

GROUP, VERSION, PLURAL = "tagpipe.io", "v1alpha1", "tagpipelines"
FINALIZER = "tagpipe.io/streams"


def runtime(memo: kopf.Memo) -> Runtime:
    rt: Runtime = memo["runtime"]
    return rt


def typed_spec(spec: kopf.Spec, name: str) -> TagPipelineSpec:
    if len(name) > MAX_NAME:
        raise kopf.PermanentError(f"name {name!r} is longer than {MAX_NAME} characters")
    try:
        return parse_spec(spec)
    except ValidationError as exc:
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc


async def login(rt: Runtime, **kwargs: Any) -> kopf.ConnectionInfo | None:
    info = rt.preset or kopf.login_with_service_account(**kwargs)
    info = info or kopf.login_with_kubeconfig(**kwargs)
    if rt.kube is not None:
        await rt.kube.close()
    rt.connection, rt.kube = info, None  # a re-login rebuilds our client with fresh credentials
    return info


async def converge(
    spec: kopf.Spec,
    body: kopf.Body,
    name: str,
    namespace: str | None,
    uid: str,
    retry: int,
    memo: kopf.Memo,
    **_: Any,
) -> dict[str, Any]:
    typed, rt, namespace = typed_spec(spec, name), runtime(memo), namespace or "default"
    generation = int(body.get("metadata", {}).get("generation") or 0)
    if refused := flow_refusals(rt, typed):  # a spec change runs this handler again
        rt.applied.setdefault((namespace, name), Applied()).failures = refused
        for f in refused:
            kopf.warn(body, reason=f.reason, message=f.message)
        raise kopf.PermanentError("refused: " + "; ".join(f.message for f in refused))
    children, failures = await converge_children(rt, name, namespace, uid, typed, generation)
    if failures:
        for f in failures:  # an Event per object, naming it: kubectl describe shows why
            kopf.warn(body, reason=f.reason, message=f"{f.ref}: {f.message}")
        # Backs off (doubling, bounded) instead of retrying a 403/409 in a tight loop.
        delay = min(rt.settings.converge_retry_s * 2 ** min(retry, 4), 300.0)
        refs = "; ".join(f"{f.ref}: {f.message}" for f in failures)
        raise kopf.TemporaryError(f"not applied: {refs}", delay=delay)
    # An unreachable NATS does not fail the handler: the scaling loop ensures
    # the streams on its next tick and the MetricsStale condition says why.
    streams = await reconcile.try_ensure_streams(rt, namespace, name, typed)
    return {"children": children, "streams": streams}


def index_pipeline(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): loop.snapshot(body)}


async def delete_streams(
    body: kopf.Body,
    spec: kopf.Spec,
    namespace: str | None,
    uid: str,
    retry: int,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    rt, namespace = runtime(memo), namespace or "default"
    await rt.retire(uid)  # no tick in flight may re-create what goes next
    if retry >= rt.settings.stream_delete_retries:
        kopf.warn(
            body,
            reason="StreamsRetained",
            message=f"gave up deleting streams after {retry} attempts",
        )
        return  # success for kopf: the finalizer goes, deletion is never blocked forever
    try:
        deleted = await reconcile.remove_streams(rt, namespace, parse_spec(spec))
    except Exception as exc:
        raise kopf.TemporaryError(
            f"stream deletion failed: {exc!r}", delay=rt.settings.stream_delete_retry_s
        ) from exc
    kopf.info(body, reason="StreamsDeleted", message=", ".join(deleted) or "no streams found")


async def forget(name: str, namespace: str | None, uid: str, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime(memo)
    await rt.retire(uid)  # first, so no tick in flight writes the state back
    reconcile.forget(rt, namespace or "default", name)


def _wants_stream_deletion(spec: kopf.Spec, **_: Any) -> bool:
    return spec.get("deletionPolicy") == "Delete"


def configure(settings: kopf.OperatorSettings) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = 20  # INFO and up become Kubernetes Events
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


def register(
    registry: kopf.OperatorRegistry,
    settings: OperatorSettings,
    connection: kopf.ConnectionInfo | None = None,
    elector: LeaderElector | None = None,
) -> Runtime:
    """Put every handler onto `registry`; the returned runtime reaches them via memo.

    Works with `kopf.operator(registry=...)` and with `KopfRunner(registry=...)`
    alike, since the runtime is bound by closures, not by a caller-made memo.
    """
    rt = Runtime(settings=settings, preset=connection, elector=elector)

    async def bind(memo: Any, settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        memo["runtime"] = rt
        configure(settings)
        pipelines: kopf.Index[Any, Any] = kwargs["pipelines"]  # the live index, by its id
        rt.tasks.append(asyncio.create_task(loop.run(rt, pipelines), name="tagpipe-scaling"))

    async def on_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return await login(rt, **kwargs)

    async def on_cleanup(**_: Any) -> None:
        await rt.close()  # the scaling loop and the cache stop here: nothing more writes
        if rt.elector is not None:  # hand over now, not after kopf's own few seconds of exit
            await rt.elector.release()

    res = (GROUP, VERSION, PLURAL)
    kopf.on.startup(registry=registry, id="bind")(bind)
    kopf.on.login(registry=registry, id="login")(on_login)
    kopf.on.cleanup(registry=registry, id="cleanup")(on_cleanup)
    for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
        on(*res, registry=registry, id="converge")(converge)
    kopf.index(*res, registry=registry, id="pipelines")(index_pipeline)
    kopf.on.delete(*res, registry=registry, optional=True, id="forget")(forget)
    kopf.on.delete(*res, registry=registry, when=_wants_stream_deletion, id="streams")(
        delete_streams
    )
    return rt
