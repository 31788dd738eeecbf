"""The scaling policy: one pure function, `decide(ctx) -> ScalingDecision`.

Everything it needs comes in through `ScalingContext` and everything it
remembers goes out through `ScalingDecision.state`, like Ray Serve's
`autoscaling_policy`. No clock, no I/O, no globals: the operator's timer calls it
once per tick per stage, and `tagpipe simulate` replays recorded or synthetic
traffic through the very same function. A call costs a few microseconds
(it walks at most one window of recommendations).

The gateway's policy (`metric="requests in flight"`) runs the same rules on the
requests in flight its replicas report (tagpipe_common.gatewayload) instead of a
queue backlog, with the rate term off; with no replica ready that load is zero.

The rules, in the order they apply:

1. **Metric unavailable** (`backlog is None`): hold the current replicas (only
   clamped into [min, max]) and flag `metrics_stale`. Never guess, never jump
   to max (keda#7668 scaled to max on a missing consumer). History is not
   touched, so a stale tick neither starts nor ends a stabilisation window.
2. **Raw recommendation.** With the policy's rate term on (`in_flight_per_replica`
   set) and fresh rates (`ctx.rates` measured within `rate_window_s`) that show
   completions, it is what the stage must process over what one replica can:
   `ceil((arrival/s + queued / drain_s) / (capacity x target_utilization))`.
   A replica's capacity comes from Little's law: messages in service over
   completions per second is the time one message holds a slot, and a replica
   has `in_flight_per_replica` slots, so `capacity = completed/s x slots / in
   service`. Ack-pending work sized by download latency, not CPU, kept hundreds
   of idle downloaders under a backlog rule; a rise in arrivals is seen before
   any backlog builds. With `backlog_floor`, `ceil(backlog / target_backlog)`
   stays as a floor (inference, whose backlog is real queueing). Without fresh
   rates (none yet, no completions in the window, a read that stopped) the
   KEDA-style backlog rule alone decides, `ceil(backlog / target_backlog)`:
   a stale rate falls back, it never jumps.
3. **Activation and scale to zero** (only with `scale_to_zero`): from zero, a
   stage wakes up only when `backlog > activation_backlog`; once running, it
   counts as idle (recommendation 0) only when the backlog is exactly 0. The
   gap between the two is deliberate hysteresis, and it means a running stage
   never goes to sleep with work still queued. Without `scale_to_zero` the
   floor is `max(min_replicas, 1)`.
4. **Tolerance**, as the HPA does: while replicas run, an unrounded
   recommendation within `tolerance` of the current count (|wanted / current - 1|
   <= tolerance) recommends the current count. Without it, tick-to-tick noise
   on a large tier moves the recommendation by a replica or two every tick, and
   each such move is a scale event that the scale-down window later undoes
   (flapping).
5. **Clamp** the recommendation into [floor, max_replicas]; a recommendation
   above max sets `scaling_limited`.
6. **Stabilise**, as the HPA does: scale up to the *lowest* recommendation seen
   within `scale_up_window_s`, scale down to the *highest* seen within
   `scale_down_window_s`; otherwise hold. Until one full scale-down window has
   been observed (`state.started_at`), the running replica count also counts as
   a recommendation, so an operator restart (which loses the history) can never
   cause an immediate scale-down.
7. **Scale policies**, as the HPA's `behavior` (`scalelimits.py`): `scale_up`
   and `scale_down` allow so many pods or percent per period, chosen by
   `select`; a fixed step of a few pods took 30 minutes to grow a tier of
   hundreds. Scale-up counts from the replicas that are *ready* when the caller
   knows them (never fewer than the floor), so pods stuck Pending (no free GPU,
   kserve#871) stop further scale-ups. A limited scale-up sets `scaling_limited`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

from tagpipe_operator.ratemeter import RateReading
from tagpipe_operator.scalelimits import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    ScaleEvent,
    ScaleRules,
    down_limit,
    up_limit,
)


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
    scale_up: ScaleRules = DEFAULT_SCALE_UP
    scale_down: ScaleRules = DEFAULT_SCALE_DOWN
    scale_to_zero: bool = False
    in_flight_per_replica: int | None = None
    """Messages one busy replica holds unacked; None turns the rate term off."""
    target_utilization: float = 0.92
    """Share of a replica's capacity the rate term plans to use (0 < u <= 1)."""
    drain_s: float = 60.0
    """The rate term adds what drains the queued backlog within this time."""
    rate_window_s: float = 30.0
    """Rates cover this window; older rates are stale and ignored."""
    backlog_floor: bool = True
    """Keep ceil(backlog / target_backlog) as a floor under the rate term."""
    metric: str = "backlog"
    """What `ScalingContext.backlog` counts, for messages: the workers' queue backlog,
    or the gateway's own load ("requests in flight", with the rate term off)."""
    served_load: bool = False
    """The load is what the stage's own replicas serve (the gateway's requests): with
    none ready there is none, a known zero, not a missing metric."""

    @property
    def floor(self) -> int:
        """Lowest replica count while the stage has work (or cannot sleep)."""
        return max(self.min_replicas, 1)

    @property
    def longest_period_s(self) -> float:
        return max(self.scale_up.longest_period_s, self.scale_down.longest_period_s)


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
    events: tuple[ScaleEvent, ...] = ()
    """Replica changes inside the longest scale-policy period, oldest first."""


@dataclass(frozen=True)
class ScalingContext:
    now: float
    """Seconds on any monotonic clock; only differences matter."""
    backlog: int | None
    """The stage's load per `policy.metric`: pending + ack-pending over a worker stage's
    consumers, or the gateways' requests in flight; None if unreadable."""
    current_replicas: int
    policy: ScalingPolicy
    state: ScalingState = field(default_factory=ScalingState)
    ready_replicas: int | None = None
    """Ready pods when known: scale-ups count from these."""
    rates: RateReading | None = None
    """The stage's traffic over the last window (ratemeter.observe); None if unknown."""


@dataclass(frozen=True)
class ScalingDecision:
    desired_replicas: int
    reason: Reason
    message: str
    state: ScalingState
    metrics_stale: bool = False
    scaling_limited: bool = False
    recommended_replicas: int | None = None
    """Before stabilisation, scale policies and max clamp; None when stale."""
    current_replicas: int = 0
    """The context's replicas, echoed so the decision reads on its own."""
    rate_based: bool = False
    """The rate term decided (fresh rates with completions), not the backlog alone."""

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


def _ceil(x: float) -> int:
    # A hair of slack so 4.000000000001 from float division is 4, not 5.
    return math.ceil(x - 1e-9)


def usable_rates(ctx: ScalingContext) -> RateReading | None:
    """The context's rates if the rate term may use them: on, fresh, with completions."""
    p, r = ctx.policy, ctx.rates
    if p.in_flight_per_replica is None or r is None:
        return None
    if ctx.now - r.measured_at > p.rate_window_s:
        return None  # stale: the backlog rule decides, never a remembered rate
    if r.completed_per_s <= 0 or r.in_service <= 0:
        return None  # no completions yet: no capacity to divide by
    return r


def replica_capacity(r: RateReading, in_flight_per_replica: int) -> float:
    """Completions/s one busy replica sustains (Little's law; see rule 2)."""
    return r.completed_per_s * in_flight_per_replica / r.in_service


def _wanted(ctx: ScalingContext) -> tuple[float, bool]:
    """Unrounded replicas the traffic calls for, and whether the rate term set it."""
    p, backlog = ctx.policy, ctx.backlog or 0
    by_backlog = backlog / p.target_backlog
    r = usable_rates(ctx)
    if r is None or p.in_flight_per_replica is None:
        return by_backlog, False
    need = r.arrival_per_s + r.queued / p.drain_s
    by_rate = need / (replica_capacity(r, p.in_flight_per_replica) * p.target_utilization)
    return (max(by_rate, by_backlog) if p.backlog_floor else by_rate), True


def _raw_recommendation(ctx: ScalingContext, wanted: float) -> tuple[int, Reason | None]:
    """Unclamped replicas, and a reason when activation rules apply."""
    p, backlog = ctx.policy, ctx.backlog or 0
    raw = _ceil(wanted)
    if not p.scale_to_zero:
        return raw, None
    if ctx.current_replicas == 0:
        if backlog > p.activation_backlog:
            return max(raw, p.floor), Reason.ACTIVATE
        return 0, Reason.IDLE
    if backlog == 0:
        return 0, Reason.IDLE
    return max(raw, p.floor), None


def _within_tolerance(ctx: ScalingContext, wanted: float) -> bool:
    """Whether what is wanted is close enough to the running count to leave it alone.

    Only with replicas running (from zero the ratio is undefined, and activation
    rules apply); an empty backlog is outside any tolerance below 1, so a stage can
    still go idle.
    """
    cur = ctx.current_replicas
    if cur <= 0 or (ctx.policy.scale_to_zero and ctx.backlog == 0):
        return False
    # Compared in replica units with a hair of slack, so the band's edges are inclusive
    # (110 against 100 at 10% holds; 1.1 - 1.0 is 0.10000000000000009 in floats).
    return abs(wanted - cur) <= ctx.policy.tolerance * cur + 1e-9


def _window(recs: tuple[Recommendation, ...], now: float, width: float) -> list[int]:
    return [r.replicas for r in recs if r.at >= now - width]


def _stale(ctx: ScalingContext) -> ScalingDecision:
    p = ctx.policy
    low = 0 if p.scale_to_zero else p.floor
    held = _clamp(ctx.current_replicas, low, p.max_replicas)
    return ScalingDecision(
        desired_replicas=held,
        reason=Reason.METRICS_STALE,
        message=f"{p.metric} unavailable; holding {held} replicas",
        state=ctx.state,
        metrics_stale=True,
        current_replicas=ctx.current_replicas,
    )


def _limited_move(ctx: ScalingContext, up_rec: int, down_rec: int) -> tuple[int, bool]:
    """Rules 6-7: the stabilised target, moved at most as far as the scale policies let."""
    p, now, cur, events = ctx.policy, ctx.now, ctx.current_replicas, ctx.state.events
    if up_rec > cur:
        counted = cur if ctx.ready_replicas is None else max(ctx.ready_replicas, p.floor)
        reach = max(cur, up_limit(p.scale_up, events, now, cur, counted))
        return min(up_rec, reach), reach < up_rec
    if down_rec < cur:
        return max(down_rec, min(cur, down_limit(p.scale_down, events, now, cur))), False
    return cur, False


def decide(ctx: ScalingContext) -> ScalingDecision:
    """Desired replicas for one stage at `ctx.now`. Pure; see the module docstring."""
    if ctx.backlog is None and ctx.policy.served_load and ctx.ready_replicas == 0:
        ctx = replace(ctx, backlog=0)  # no replica serves, so no request is in flight
    if ctx.backlog is None:
        return _stale(ctx)
    p, now, cur = ctx.policy, ctx.now, ctx.current_replicas
    wanted, rate_based = _wanted(ctx)
    raw, activation_reason = _raw_recommendation(ctx, wanted)
    tolerated = _within_tolerance(ctx, wanted)
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

    desired, policy_limited = _limited_move(ctx, up_rec, down_rec)
    desired = _clamp(desired, 0 if p.scale_to_zero else p.floor, p.max_replicas)
    limited = limited or policy_limited
    reason = _reason(cur, desired, rec, activation_reason)
    events = tuple(e for e in ctx.state.events if e.at > now - p.longest_period_s)
    if desired != cur:
        events = (*events, ScaleEvent(now, desired - cur))
    state = ScalingState(
        recommendations=recs,
        started_at=started,
        last_scale_time=now if desired != cur else ctx.state.last_scale_time,
        events=events,
    )
    return ScalingDecision(
        desired_replicas=desired,
        reason=reason,
        message=_message(ctx, wanted, rate_based, raw, rec, desired, limited, tolerated),
        state=state,
        scaling_limited=limited,
        recommended_replicas=raw,
        current_replicas=cur,
        rate_based=rate_based,
    )


def _reason(cur: int, desired: int, rec: int, activation: Reason | None) -> Reason:
    if desired == cur:
        return Reason.STEADY if rec == cur else Reason.HOLD_WINDOW
    if cur == 0 and activation is Reason.ACTIVATE:
        return Reason.ACTIVATE
    if desired == 0 and activation is Reason.IDLE:
        return Reason.IDLE
    return Reason.SCALE_UP if desired > cur else Reason.SCALE_DOWN


def _basis(ctx: ScalingContext, rate_based: bool) -> str:
    p, r = ctx.policy, ctx.rates
    if not rate_based or r is None or p.in_flight_per_replica is None:
        stale = " (rates stale or none yet)" if p.in_flight_per_replica is not None else ""
        return f"{p.metric} {ctx.backlog} / target {p.target_backlog} per replica{stale}"
    cap = replica_capacity(r, p.in_flight_per_replica)
    return (
        f"arrivals {r.arrival_per_s:.1f}/s + queued {r.queued} over {p.drain_s:g} s, "
        f"capacity {cap:.1f}/s per replica at {p.target_utilization:.0%}"
        + (f", backlog floor {ctx.backlog}/{p.target_backlog}" if p.backlog_floor else "")
    )


def _message(
    ctx: ScalingContext,
    wanted: float,
    rate_based: bool,
    raw: int,
    rec: int,
    desired: int,
    limited: bool,
    tolerated: bool,
) -> str:
    p = ctx.policy
    text = f"{_basis(ctx, rate_based)} -> {raw}; replicas {ctx.current_replicas} -> {desired}"
    if tolerated and raw != ctx.current_replicas:
        text += f" (within tolerance {p.tolerance:.0%} of {wanted:.1f})"
    if desired != rec and desired == ctx.current_replicas:
        text += " (held by stabilisation window)"
    if limited:
        text += f" (limited: max {p.max_replicas} or the scale-up policies)"
    return text
