"""The TagPipeline status: a pure function of what one reconcile tick observed.

Conditions follow the Kubernetes convention (type, status, reason, message,
lastTransitionTime), and a transition time moves only when the status flips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tagpipe_operator.children import Failure
from tagpipe_operator.scaling import ScalingDecision


@dataclass(frozen=True)
class StageObservation:
    stage: str
    backlog: int | None
    decision: ScalingDecision | None
    """None when the stage's Deployment was missing this tick."""
    ready: int


def transition(
    previous: list[dict[str, Any]], type_: str, ok: bool, reason: str, message: str, now: str
) -> dict[str, Any]:
    """One condition, keeping its lastTransitionTime while its status stays the same."""
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }


def _stage_status(o: StageObservation, old: dict[str, Any], now: str) -> dict[str, Any]:
    d = o.decision
    return {
        "desiredReplicas": d.desired_replicas if d else None,
        "currentReplicas": d.current_replicas if d else None,
        "readyReplicas": o.ready,
        "backlog": o.backlog,
        "lastScaleTime": now if d is not None and d.changed else old.get("lastScaleTime"),
    }


def _serving(o: StageObservation) -> bool:
    """A stage serves when some pod is ready, or when it is asleep on purpose."""
    d = o.decision
    return d is not None and (o.ready >= 1 or d.desired_replicas == 0)


def build_status(
    generation: int | None,
    observed: list[StageObservation],
    previous: dict[str, Any],
    now: str,
    recreated: list[str] | None = None,
    metrics_problem: str | None = None,
    failures: list[Failure] | None = None,
) -> dict[str, Any]:
    """The whole status block for one tick; `now` is an RFC 3339 timestamp.

    `generation` is the last one whose children all applied (None: none yet).
    `metrics_problem` says why the backlog could not be read ('NATS <url>: <reason>').
    `failures` are the children the last converge or drift check could not apply.
    """
    prev_conditions: list[dict[str, Any]] = list(previous.get("conditions") or [])
    prev_stages: dict[str, Any] = dict(previous.get("stages") or {})
    by_stage = {o.stage: o for o in observed}
    down, inf = by_stage.get("downloader"), by_stage.get("inference")
    total = None
    if down and inf and down.backlog is not None and inf.backlog is not None:
        total = down.backlog + inf.backlog
    return {
        "observedGeneration": generation,
        "backlog": total,
        "downloaders": _ratio(down),
        "inference": _ratio(inf),
        "stages": {
            o.stage: _stage_status(o, dict(prev_stages.get(o.stage) or {}), now) for o in observed
        },
        "conditions": [
            *_conditions(observed, prev_conditions, now, recreated, metrics_problem, failures),
            _conflict_condition(prev_conditions, failures or [], now),
        ],
    }


def _conflict_condition(
    prev_conditions: list[dict[str, Any]], failures: list[Failure], now: str
) -> dict[str, Any]:
    taken = [f.message for f in failures if f.reason == "Conflict"]
    if not taken:
        msg = "every child is controlled by this TagPipeline"
        return transition(prev_conditions, "Conflict", False, "NoConflict", msg, now)
    return transition(prev_conditions, "Conflict", True, "NotOwned", "; ".join(taken), now)


def _ready_condition(
    prev_conditions: list[dict[str, Any]],
    not_serving: list[str],
    failures: list[Failure],
    now: str,
) -> dict[str, Any]:
    """Ready=False with the API's reason while any child failed to apply."""
    if failures:
        msg = "; ".join(f"{f.ref}: {f.message}" for f in failures)
        return transition(prev_conditions, "Ready", False, failures[0].reason, msg, now)
    return transition(
        prev_conditions,
        "Ready",
        not not_serving,
        "AllStagesServing" if not not_serving else "StagesNotServing",
        "not serving: " + ", ".join(not_serving) if not_serving else "all stages serving",
        now,
    )


def _conditions(
    observed: list[StageObservation],
    prev_conditions: list[dict[str, Any]],
    now: str,
    recreated: list[str] | None,
    metrics_problem: str | None = None,
    failures: list[Failure] | None = None,
) -> list[dict[str, Any]]:
    not_serving = [o.stage for o in observed if not _serving(o)]
    lagging = [
        o.stage for o in observed if o.decision is None or o.ready < o.decision.desired_replicas
    ]
    limited = [
        f"{o.stage}: {o.decision.message}"
        for o in observed
        if o.decision and o.decision.scaling_limited
    ]
    stale = [o.stage for o in observed if o.decision is None or o.decision.metrics_stale]
    degraded_msg = ", ".join(lagging) + (f"; recreated {', '.join(recreated)}" if recreated else "")
    return [
        _ready_condition(prev_conditions, not_serving, failures or [], now),
        transition(
            prev_conditions,
            "Degraded",
            bool(lagging or recreated),
            "ReplicasNotReady" if lagging or recreated else "AsDesired",
            degraded_msg or "every stage has its desired replicas ready",
            now,
        ),
        transition(
            prev_conditions,
            "ScalingLimited",
            bool(limited),
            "MaxOrStepReached" if limited else "WithinBounds",
            "; ".join(limited) or "no stage is capped",
            now,
        ),
        _stale_condition(prev_conditions, stale, metrics_problem, now),
    ]


def _stale_condition(
    prev_conditions: list[dict[str, Any]], stale: list[str], problem: str | None, now: str
) -> dict[str, Any]:
    if not stale:
        return transition(
            prev_conditions, "MetricsStale", False, "BacklogRead", "backlog read", now
        )
    held = "holding replicas for: " + ", ".join(stale)
    if problem is None:  # a stage without a Deployment: nothing to read it for
        return transition(prev_conditions, "MetricsStale", True, "BacklogUnavailable", held, now)
    # Say which NATS and why: the operator's log holds one line per tick, no more.
    msg = f"{problem}; {held}"
    return transition(prev_conditions, "MetricsStale", True, "NatsUnavailable", msg, now)


def _ratio(o: StageObservation | None) -> str:
    if o is None or o.decision is None:
        return "-"
    return f"{o.ready}/{o.decision.desired_replicas}"
