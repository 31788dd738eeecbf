"""Applying a TagPipeline's children: server-side apply, no take-overs, a failure per object.

`apply_child` never writes to an object whose name a child needs unless this
TagPipeline controls it (its ownerReference with `controller: true`): an object
made by hand, or by another TagPipeline, is left as it is and reported as a
`Conflict`. A failure of one child does not stop the others; each is reported
by object with the API's reason, and `ok_generation` moves only when all applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tagpipe_operator import flow
from tagpipe_operator.kube import describe_api, reason
from tagpipe_operator.render import render
from tagpipe_operator.spec import TagPipelineSpec

if TYPE_CHECKING:
    from tagpipe_operator.reconcile import Runtime


@dataclass(frozen=True)
class Failure:
    """A child that could not be applied: which one, the API's reason, its message."""

    ref: str
    reason: str
    message: str


class ChildConflict(Exception):
    """A child's name is taken by an object this TagPipeline does not control."""

    def __init__(self, ref: str, holder: str) -> None:
        super().__init__(f"{ref} exists and is not controlled by this TagPipeline ({holder})")
        self.ref = ref


@dataclass
class Applied:
    """The last converge of one pipeline, as this process saw it."""

    ok_generation: int | None = None
    """The last generation whose every child applied; None before the first success."""
    failures: list[Failure] = field(default_factory=list)


def controlled_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


async def apply_child(rt: Runtime, obj: Mapping[str, Any], uid: str) -> str:
    """Server-side apply one child unless its name is taken by someone else's object.

    The cache answers for our own children; a name it does not hold costs one GET,
    so an object made by hand (no managed-by label, never cached) is seen and left
    untouched. Returns 'created' or 'applied'; raises ChildConflict or ApiError.
    """
    kind, m = obj["kind"], obj["metadata"]
    ref = f"{kind}/{m['name']}"
    current = rt.children().get(kind, m["namespace"], m["name"])
    if current is None:
        current = await rt.client().get(kind, m["namespace"], m["name"])
    if current is not None and not controlled_by(current, uid):
        owners = (current.get("metadata") or {}).get("ownerReferences") or []
        holder = ", ".join(f"{o.get('kind')}/{o.get('name')}" for o in owners) or "no owner"
        raise ChildConflict(ref, f"owned by {holder}")
    body, replicas = without_replicas(obj)
    await rt.client().apply(body)
    if current is None and replicas is not None:
        await rt.client().set_replicas(m["namespace"], m["name"], replicas)
    return "created" if current is None else "applied"


def without_replicas(obj: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """The manifest to apply, and a Deployment's replicas taken out of it.

    An apply that named `spec.replicas` would own it and put it back on every
    converge; one that stopped naming it would have the server drop it (to 1).
    So no apply ever names it: a new Deployment gets its first replicas through
    the `scale` subresource right after its create, like every later change.
    """
    body = dict(obj)
    if body.get("kind") != "Deployment" or "replicas" not in body.get("spec", {}):
        return body, None
    spec = dict(body["spec"])
    replicas = int(spec.pop("replicas"))
    body["spec"] = spec
    return body, replicas


def failure(ref: str, exc: BaseException) -> Failure:
    if isinstance(exc, ChildConflict):
        return Failure(ref, "Conflict", str(exc))
    return Failure(ref, reason(exc), describe_api(exc))


async def apply_all(
    rt: Runtime, objs: list[dict[str, Any]], uid: str, only_missing: bool = False
) -> tuple[dict[str, str], list[Failure]]:
    """Apply each child, going on past a failure so that one bad object never
    leaves the rest unapplied; returns what was done and what failed, by object."""
    done: dict[str, str] = {}
    failures: list[Failure] = []
    for obj in objs:
        m = obj["metadata"]
        ref = f"{obj['kind']}/{m['name']}"
        if only_missing and rt.children().get(obj["kind"], m["namespace"], m["name"]):
            continue
        try:
            done[ref] = await apply_child(rt, obj, uid)
        except Exception as exc:  # reported by object; the next converge or tick retries
            failures.append(failure(ref, exc))
    return done, failures


async def converge(
    rt: Runtime, name: str, namespace: str, uid: str, spec: TagPipelineSpec, generation: int
) -> tuple[dict[str, str], list[Failure]]:
    """Apply every child; record the outcome for the status the loop writes."""
    done, failures = await apply_all(rt, render(name, namespace, uid, spec), uid)
    state = rt.applied.setdefault((namespace, name), Applied())
    state.failures = failures
    if not failures:
        state.ok_generation = generation
    return done, failures


def flow_refusals(rt: Runtime, spec: TagPipelineSpec) -> list[Failure]:
    """Flow-control settings this spec (or the operator's env) sets against the
    deployment (flow.py): the pipeline is refused whole, as Ready=False reason
    FlowLimits, and neither converged nor drift-corrected until they change."""
    return [Failure("spec", "FlowLimits", p) for p in flow.problems(spec, rt.settings)]


async def recreate_missing(
    rt: Runtime, body: Mapping[str, Any], spec: TagPipelineSpec
) -> tuple[list[str], list[Failure]]:
    """Drift correction: a child missing from the cache is applied again (no patch
    storm: present children are left to converge). Returns (recreated, failures)."""
    meta = body["metadata"]
    objs = render(meta["name"], meta["namespace"], meta["uid"], spec)
    done, failures = await apply_all(rt, objs, meta["uid"], only_missing=True)
    return [ref for ref, how in done.items() if how == "created"], failures
