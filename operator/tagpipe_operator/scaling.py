"""The scaling policy: one pure function, `decide(ctx) -> ScalingDecision`.

Everything it needs comes in through `ScalingContext` and everything it
remembers goes out through `ScalingDecision.state`, like Ray Serve's
`autoscaling_policy`. No clock, no I/O, no globals: the operator's timer calls it
once per tick per stage, and `tagpipe simulate` replays recorded or synthetic
traffic through the very same function. A call costs a few microseconds
(it walks at most one window of recommendations).

The rules, in the order they apply:

1. **Metric unavailable** (`backlog is None`): hold the current replicas (only
   clamped into [min, max]) and flag `metrics_stale`. Never guess, never jump
   to max (keda#7668 scaled to max on a missing consumer). History is not
   touched, so a stale tick neither starts nor ends a stabilisation window.
2. **Raw recommendation**, KEDA-style: `ceil(backlog / target_backlog)`.
3. **Activation and scale to zero** (only with `scale_to_zero`): from zero, a
   stage wakes up only when `backlog > activation_backlog`; once running, it
   counts as idle (recommendation 0) only when the backlog is exactly 0. The
   gap between the two is deliberate hysteresis, and it means a running stage
   never goes to sleep with work still queued. Without `scale_to_zero` the
   floor is `max(min_replicas, 1)`.
4. **Tolerance**, as the HPA does: while replicas run, a backlog within
   `tolerance` of the target (|backlog / (target x current) - 1| <= tolerance)
   recommends the current count. Without it, tick-to-tick noise on a large tier
   moves the recommendation by a replica or two every tick, and each such move
   is a scale event that the scale-down window later undoes (flapping).
5. **Clamp** the recommendation into [floor, max_replicas]; a recommendation
   above max sets `scaling_limited`.
6. **Stabilise**, as the HPA does: scale up to the *lowest* recommendation seen
   within `scale_up_window_s`, scale down to the *highest* seen within
   `scale_down_window_s`; otherwise hold. Until one full scale-down window has
   been observed (`state.started_at`), the running replica count also counts as
   a recommendation, so an operator restart (which loses the history) can never
   cause an immediate scale-down.
7. **Step limit**: add at most `max_scale_up_step` replicas per decision,
   counted from the replicas that are *ready* when the caller knows them, so
   pods stuck Pending (no free GPU, kserve#871) stop further scale-ups. Both
   set `scaling_limited`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum


class Reason(StrEnum):
    """Low-cardinality reason codes: Kubernetes Event reasons and metric labels."""

    METRICS_STALE = "MetricsStale"
    SCALE_UP = "BacklogAboveTarget"
    SCALE_DOWN = "BacklogBelowTarget"
    ACTIVATE = "Activated"
    IDLE = "IdleScaleToZero"
    HOLD_WINDOW = "StabilisationWindow"
    STEADY = "AtTarget"


@dataclass(frozen=True)
class ScalingPolicy:
    """One stage's knobs, as in the TagPipeline spec's `autoscaling` block."""

    min_replicas: int = 1
    max_replicas: int = 10
    target_backlog: int = 10
    """Messages (pending + ack-pending) one replica should have queued."""
    activation_backlog: int = 0
    """From zero replicas, wake only when the backlog exceeds this."""
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 300.0
    tolerance: float = 0.1
    """Relative band around the target with no change (HPA's default 10%); < 1."""
    max_scale_up_step: int = 4
    """Replicas added per decision at most (>= 1)."""
    scale_to_zero: bool = False

    @property
    def floor(self) -> int:
        """Lowest replica count while the stage has work (or cannot sleep)."""
        return max(self.min_replicas, 1)


@dataclass(frozen=True)
class Recommendation:
    at: float
    replicas: int


@dataclass(frozen=True)
class ScalingState:
    """What decide() remembers between calls; start from `ScalingState()`."""

    recommendations: tuple[Recommendation, ...] = ()
    """Recommendations inside the longer of the two windows, oldest first."""
    started_at: float | None = None
    """When this history began (first non-stale call)."""
    last_scale_time: float | None = None
    """When a decision last changed the replica count."""


@dataclass(frozen=True)
class ScalingContext:
    now: float
    """Seconds on any monotonic clock; only differences matter."""
    backlog: int | None
    """pending + ack-pending over the stage's consumers; None if unreadable."""
    current_replicas: int
    policy: ScalingPolicy
    state: ScalingState = field(default_factory=ScalingState)
    ready_replicas: int | None = None
    """Ready pods when known: scale-up steps count from these."""


@dataclass(frozen=True)
class ScalingDecision:
    desired_replicas: int
    reason: Reason
    message: str
    state: ScalingState
    metrics_stale: bool = False
    scaling_limited: bool = False
    recommended_replicas: int | None = None
    """Before stabilisation, step limit and max clamp; None when stale."""
    current_replicas: int = 0
    """The context's replicas, echoed so the decision reads on its own."""

    @property
    def direction(self) -> str:
        """'up', 'down' or 'none'."""
        cur, new = self.current_replicas, self.desired_replicas
        return "up" if new > cur else "down" if new < cur else "none"

    @property
    def changed(self) -> bool:
        return self.desired_replicas != self.current_replicas


def _clamp(n: int, low: int, high: int) -> int:
    return max(low, min(n, high))


def _raw_recommendation(ctx: ScalingContext) -> tuple[int, Reason | None]:
    """Unclamped replicas for the backlog, and a reason when activation rules apply."""
    p, backlog = ctx.policy, ctx.backlog or 0
    raw = math.ceil(backlog / p.target_backlog)
    if not p.scale_to_zero:
        return raw, None
    if ctx.current_replicas == 0:
        if backlog > p.activation_backlog:
            return max(raw, p.floor), Reason.ACTIVATE
        return 0, Reason.IDLE
    if backlog == 0:
        return 0, Reason.IDLE
    return max(raw, p.floor), None


def _within_tolerance(ctx: ScalingContext) -> bool:
    """Whether the backlog is close enough to target x current to leave replicas alone.

    Only with replicas running (from zero the ratio is undefined, and activation
    rules apply); an empty backlog is outside any tolerance below 1, so a stage can
    still go idle.
    """
    cur, backlog, p = ctx.current_replicas, ctx.backlog or 0, ctx.policy
    if cur <= 0:
        return False
    at_target = p.target_backlog * cur
    # Compared in backlog units with a hair of slack, so the band's edges are inclusive
    # (110 against 100 at 10% holds; 1.1 - 1.0 is 0.10000000000000009 in floats).
    return abs(backlog - at_target) <= p.tolerance * at_target + 1e-9


def _window(recs: tuple[Recommendation, ...], now: float, width: float) -> list[int]:
    return [r.replicas for r in recs if r.at >= now - width]


def _stale(ctx: ScalingContext) -> ScalingDecision:
    p = ctx.policy
    low = 0 if p.scale_to_zero else p.floor
    held = _clamp(ctx.current_replicas, low, p.max_replicas)
    return ScalingDecision(
        desired_replicas=held,
        reason=Reason.METRICS_STALE,
        message=f"backlog unavailable; holding {held} replicas",
        state=ctx.state,
        metrics_stale=True,
        current_replicas=ctx.current_replicas,
    )


def decide(ctx: ScalingContext) -> ScalingDecision:
    """Desired replicas for one stage at `ctx.now`. Pure; see the module docstring."""
    if ctx.backlog is None:
        return _stale(ctx)
    p, now, cur = ctx.policy, ctx.now, ctx.current_replicas
    raw, activation_reason = _raw_recommendation(ctx)
    tolerated = _within_tolerance(ctx)
    # Within tolerance the recommendation *is* the current count, and that is what the
    # windows remember (as the HPA does), so a noisy tick cannot open a scale-up later.
    low = 0 if (p.scale_to_zero and raw == 0) else p.floor
    rec = _clamp(cur if tolerated else raw, low, p.max_replicas)
    limited = not tolerated and raw > p.max_replicas

    started = ctx.state.started_at if ctx.state.started_at is not None else now
    keep = max(p.scale_up_window_s, p.scale_down_window_s)
    recs = (*ctx.state.recommendations, Recommendation(now, rec))
    recs = tuple(r for r in recs if r.at >= now - keep)
    up_rec = min(_window(recs, now, p.scale_up_window_s))
    down_candidates = _window(recs, now, p.scale_down_window_s)
    if now - started < p.scale_down_window_s:
        down_candidates.append(cur)  # no full window seen yet: never below what runs
    down_rec = max(down_candidates)

    if up_rec > cur:
        base = cur if ctx.ready_replicas is None else min(cur, ctx.ready_replicas)
        desired = min(up_rec, max(cur, base + p.max_scale_up_step))
        limited = limited or desired < up_rec
    elif down_rec < cur:
        desired = down_rec
    else:
        desired = cur
    desired = _clamp(desired, 0 if p.scale_to_zero else p.floor, p.max_replicas)
    reason = _reason(cur, desired, rec, activation_reason)

    state = ScalingState(
        recommendations=recs,
        started_at=started,
        last_scale_time=now if desired != cur else ctx.state.last_scale_time,
    )
    return ScalingDecision(
        desired_replicas=desired,
        reason=reason,
        message=_message(ctx, raw, rec, desired, limited, tolerated),
        state=state,
        scaling_limited=limited,
        recommended_replicas=raw,
        current_replicas=cur,
    )


def _reason(cur: int, desired: int, rec: int, activation: Reason | None) -> Reason:
    if desired == cur:
        return Reason.STEADY if rec == cur else Reason.HOLD_WINDOW
    if cur == 0 and activation is Reason.ACTIVATE:
        return Reason.ACTIVATE
    if desired == 0 and activation is Reason.IDLE:
        return Reason.IDLE
    return Reason.SCALE_UP if desired > cur else Reason.SCALE_DOWN


def _message(
    ctx: ScalingContext, raw: int, rec: int, desired: int, limited: bool, tolerated: bool
) -> str:
    p = ctx.policy
    text = (
        f"backlog {ctx.backlog} / target {p.target_backlog} per replica -> {raw}; "
        f"replicas {ctx.current_replicas} -> {desired}"
    )
    if tolerated and raw != ctx.current_replicas:
        text += f" (within tolerance {p.tolerance:.0%})"
    if desired != rec and desired == ctx.current_replicas:
        text += " (held by stabilisation window)"
    if limited:
        text += f" (limited: max {p.max_replicas}, step {p.max_scale_up_step})"
    return text
