"""The scaling loop: one operator-wide task, not a kopf timer per TagPipeline.

kopf puts a finalizer on every object that has a timer or daemon, and a
finalizer blocks deletion whenever the operator is down (kopf#75). A plain
background task over a kopf index (the latest body of every TagPipeline) needs
none, so only `deletionPolicy: Delete` objects carry a finalizer.

Every `scale_interval_s` it runs `tick()` for each pipeline concurrently; a
pipeline's ticks never overlap (one loop), and one slow pipeline is bounded by
its own timeout. Status goes through the `status` subresource.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from tagpipe_operator import children, deprecations, reconcile
from tagpipe_operator.reconcile import Runtime
from tagpipe_operator.spec import STAGES, parse_spec
from tagpipe_operator.status import StageObservation, build_status

log = logging.getLogger(__name__)

Pipelines = Mapping[Any, Iterable[Mapping[str, Any]]]


def snapshot(body: kopf.Body) -> dict[str, Any]:
    """What the index keeps per pipeline: a frozen copy of the latest body."""
    return copy.deepcopy(dict(body))


async def tick(rt: Runtime, body: Mapping[str, Any]) -> dict[str, Any]:
    """Observe, scale and write status for one pipeline; returns the status."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    spec = parse_spec(body["spec"])
    recreated: list[str] = []
    if refused := children.flow_refusals(rt, spec):
        drift_failures = refused
    else:
        recreated, drift_failures = await children.recreate_missing(rt, body, spec)
    backlogs = await reconcile.read_backlogs(rt, ns, spec, name)
    if backlogs.problem:  # one line per tick: the condition carries the rest
        log.warning("TagPipeline %s/%s: %s; holding replicas", ns, name, backlogs.problem)
    observed = []
    for stage in STAGES:
        backlog = backlogs.by_stage[stage]
        result = await reconcile.scale_stage(rt, body, spec, stage, backlog)
        decision, ready = result if result else (None, 0)
        observed.append(StageObservation(stage, backlog, decision, ready))
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    previous = dict(body.get("status") or {})
    applied = rt.applied.get((ns, name)) or children.Applied()
    # Only a converge that applied every child moves observedGeneration: a spec
    # that failed to apply must not read as observed (kubectl wait, Argo CD).
    generation = applied.ok_generation
    if generation is None:
        generation = previous.get("observedGeneration")
    failures = applied.failures + [f for f in drift_failures if f not in applied.failures]
    status = build_status(
        generation, observed, previous, now, recreated, backlogs.problem, failures=failures
    )
    await deprecations.report(rt.client(), body, status, previous, now)
    await rt.client().patch_status(ns, name, status)
    return status


async def _guarded_tick(rt: Runtime, body: Mapping[str, Any]) -> None:
    meta = body.get("metadata", {})
    uid = str(meta.get("uid"))
    if meta.get("deletionTimestamp") or uid in rt.retired:
        return  # being deleted: leave it to garbage collection and the delete handler
    try:
        async with rt.tick_lock(uid), asyncio.timeout(max(rt.settings.scale_interval_s, 1.0) * 4):
            if uid not in rt.retired:  # retired while this tick waited for the lock
                await tick(rt, body)
    except Exception as exc:  # one broken pipeline must not stop the others
        log.warning(
            "TagPipeline %s/%s: scaling tick failed: %s",
            meta.get("namespace"),
            meta.get("name"),
            reconcile.describe(exc),
        )


def _may_tick(rt: Runtime) -> bool:
    """Logged in, holding the Lease (a lost one stops writes at once, before kopf
    has stopped), and the child cache has listed every kind once."""
    return rt.connection is not None and rt.leading() and rt.children().synced


async def run(rt: Runtime, pipelines: Pipelines) -> None:
    """Forever: tick every indexed pipeline, then sleep the interval."""
    while True:
        bodies = [b for group in list(pipelines.values()) for b in list(group)]
        if _may_tick(rt):
            await asyncio.gather(*(_guarded_tick(rt, b) for b in bodies))
        await asyncio.sleep(rt.settings.scale_interval_s)
