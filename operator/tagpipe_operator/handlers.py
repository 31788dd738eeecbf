"""kopf handlers: thin, typed, and registered by `register()` onto a registry.

Registration is a function, not import-time decorators, so the timer interval
and the login come from settings built in `main()` (or a test), never from the
environment at import time.

* create/update/resume: converge children (create or patch) and ensure streams.
* timer (every `scale_interval_s`): recreate missing children, read backlogs,
  decide and apply replicas, write status. kopf never overlaps a timer with
  itself, so one TagPipeline never has two scaling decisions in flight.
* delete: children go by owner-reference garbage collection; streams are
  removed only under `deletionPolicy: Delete`, and only that case carries a
  finalizer, released after bounded retries even when NATS is gone.
"""

from __future__ import annotations

import datetime
from typing import Any

import kopf
from pydantic import ValidationError

from tagpipe_operator import reconcile
from tagpipe_operator.reconcile import Runtime
from tagpipe_operator.render import MAX_NAME
from tagpipe_operator.settings import OperatorSettings
from tagpipe_operator.spec import STAGES, TagPipelineSpec, parse_spec
from tagpipe_operator.status import StageObservation, build_status

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


async def on_login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    rt = runtime(memo)
    info = rt.preset or kopf.login_with_service_account(**kwargs)
    info = info or kopf.login_with_kubeconfig(**kwargs)
    if rt.kube is not None:
        await rt.kube.close()
    rt.connection, rt.kube = info, None  # a re-login rebuilds our client with fresh credentials
    return info


async def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    await runtime(memo).close()


async def converge(
    spec: kopf.Spec, name: str, namespace: str | None, uid: str, memo: kopf.Memo, **_: Any
) -> dict[str, Any]:
    typed, rt, namespace = typed_spec(spec, name), runtime(memo), namespace or "default"
    try:
        children = await reconcile.converge(rt, name, namespace, uid, typed)
        await reconcile.ensure_pipeline_streams(rt, namespace, typed)
    except Exception as exc:
        raise kopf.TemporaryError(
            f"converge failed: {exc!r}", delay=rt.settings.converge_retry_s
        ) from exc
    return {"children": children}


async def tick(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    typed, rt = typed_spec(spec, body["metadata"]["name"]), runtime(memo)
    recreated = await reconcile.recreate_missing(rt, body, typed)
    backlogs = await reconcile.read_backlogs(rt, body["metadata"]["namespace"], typed)
    observed = []
    for stage in STAGES:
        result = await reconcile.scale_stage(rt, body, typed, stage, backlogs[stage])
        decision, ready = result if result else (None, 0)
        observed.append(StageObservation(stage, backlogs[stage], decision, ready))
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    generation = int(body["metadata"].get("generation") or 0)
    patch.status.update(build_status(generation, observed, dict(status), now, recreated))


async def delete_streams(
    body: kopf.Body, spec: kopf.Spec, namespace: str | None, retry: int, memo: kopf.Memo, **_: Any
) -> None:
    rt, namespace = runtime(memo), namespace or "default"
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


async def forget(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    reconcile.forget(runtime(memo), namespace or "default", name)


def _wants_stream_deletion(spec: kopf.Spec, **_: Any) -> bool:
    return spec.get("deletionPolicy") == "Delete"


def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = 20  # INFO and up become Kubernetes Events
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


def register(
    registry: kopf.OperatorRegistry,
    settings: OperatorSettings,
    memo: kopf.Memo,
    connection: kopf.ConnectionInfo | None = None,
) -> None:
    """Put the runtime into `memo` and every handler onto `registry`."""
    memo["runtime"] = Runtime(settings=settings, preset=connection)
    res = (GROUP, VERSION, PLURAL)
    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(on_login)
    kopf.on.cleanup(registry=registry)(on_cleanup)
    for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
        on(*res, registry=registry, id="converge")(converge)
    every = settings.scale_interval_s
    kopf.timer(*res, registry=registry, interval=every, backoff=every, id="scale")(tick)
    kopf.on.delete(*res, registry=registry, optional=True, id="forget")(forget)
    kopf.on.delete(*res, registry=registry, when=_wants_stream_deletion, id="streams")(
        delete_streams
    )
