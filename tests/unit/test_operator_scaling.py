"""decide(): parametrized cases with no mocks, plus replayed series.

Contexts are built with `ctx(**overrides)` (as Ray Serve's tests do), and
series are replayed with `replay()`, the same loop a simulator runs.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from typing import Any

import pytest
from tagpipe_operator.scalelimits import PolicyType, RatePolicy, ScaleRules
from tagpipe_operator.scaling import (
    Reason,
    Recommendation,
    ScalingContext,
    ScalingPolicy,
    ScalingState,
    decide,
)

POLICY = ScalingPolicy(
    min_replicas=1,
    max_replicas=10,
    target_backlog=10,
    activation_backlog=5,
    scale_up_window_s=0,
    scale_down_window_s=60,
    # The old fixed step: 4 pods a decision (a period shorter than any tick here).
    scale_up=ScaleRules((RatePolicy(PolicyType.PODS, 4, 1.0),)),
)
STEP = 4
# A history old enough that the "no full window seen yet" guard is off.
SETTLED = ScalingState(started_at=-1000.0)


def ctx(**overrides: Any) -> ScalingContext:
    policy = replace(POLICY, **overrides.pop("policy", {}))
    base: dict[str, Any] = {"now": 0.0, "backlog": 0, "current_replicas": 1, "state": SETTLED}
    return ScalingContext(policy=policy, **{**base, **overrides})


def replay(
    backlogs: list[int | None], policy: ScalingPolicy, start: int, dt: float = 5.0
) -> list[int]:
    """Feed a backlog series through decide(), tick by tick; returns replicas per tick."""
    state, current, out = ScalingState(), start, []
    for i, backlog in enumerate(backlogs):
        d = decide(
            ScalingContext(
                now=i * dt, backlog=backlog, current_replicas=current, policy=policy, state=state
            )
        )
        state, current = d.state, d.desired_replicas
        out.append(current)
    return out


@pytest.mark.parametrize(
    ("overrides", "desired", "reason"),
    [
        # ceil(backlog / target), KEDA-style
        ({"backlog": 35, "current_replicas": 2}, 4, Reason.SCALE_UP),
        ({"backlog": 40, "current_replicas": 4}, 4, Reason.STEADY),
        # min/max clamps
        ({"backlog": 0, "current_replicas": 1}, 1, Reason.STEADY),
        ({"backlog": 500, "current_replicas": 9}, 10, Reason.SCALE_UP),
        ({"backlog": 0, "current_replicas": 0}, 1, Reason.SCALE_UP),  # below min, no scale to zero
        # step limit: 2 -> at most 6 even though 20 are wanted
        ({"backlog": 200, "current_replicas": 2}, 6, Reason.SCALE_UP),
        # step counts from ready pods: 4 running but only 1 ready (Pending on GPUs)
        ({"backlog": 200, "current_replicas": 4, "ready_replicas": 1}, 5, Reason.SCALE_UP),
        ({"backlog": 200, "current_replicas": 8, "ready_replicas": 2}, 8, Reason.HOLD_WINDOW),
        # down with a settled, empty history: straight to the recommendation
        ({"backlog": 15, "current_replicas": 5}, 2, Reason.SCALE_DOWN),
        # scale to zero: idle -> 0, activation 0 -> 1 only above the threshold
        ({"backlog": 0, "current_replicas": 2, "policy": {"scale_to_zero": True}}, 0, Reason.IDLE),
        (
            {"backlog": 5, "current_replicas": 0, "policy": {"scale_to_zero": True}},
            0,
            Reason.STEADY,
        ),
        (
            {"backlog": 6, "current_replicas": 0, "policy": {"scale_to_zero": True}},
            1,
            Reason.ACTIVATE,
        ),
        (
            {"backlog": 90, "current_replicas": 0, "policy": {"scale_to_zero": True}},
            4,
            Reason.ACTIVATE,
        ),
        # once running, a small backlog (<= activation) keeps one replica: no stranded work
        (
            {"backlog": 3, "current_replicas": 1, "policy": {"scale_to_zero": True}},
            1,
            Reason.STEADY,
        ),
        # min_replicas applies while active, even with scale to zero
        (
            {
                "backlog": 6,
                "current_replicas": 0,
                "policy": {"scale_to_zero": True, "min_replicas": 2},
            },
            2,
            Reason.ACTIVATE,
        ),
    ],
)
def test_single_decisions(overrides: dict[str, Any], desired: int, reason: Reason) -> None:
    d = decide(ctx(**overrides))
    assert (d.desired_replicas, d.reason) == (desired, reason), d.message
    assert not d.metrics_stale


@pytest.mark.parametrize(
    ("overrides", "limited"),
    [
        ({"backlog": 500, "current_replicas": 9}, True),  # max
        ({"backlog": 200, "current_replicas": 2}, True),  # step
        ({"backlog": 30, "current_replicas": 2}, False),
    ],
)
def test_scaling_limited_flag(overrides: dict[str, Any], limited: bool) -> None:
    assert decide(ctx(**overrides)).scaling_limited is limited


@pytest.mark.parametrize("current", [0, 1, 3, 10])
def test_stale_metric_holds_and_never_jumps_to_max(current: int) -> None:
    state = ScalingState(recommendations=(Recommendation(-5.0, 7),), started_at=-100.0)
    d = decide(
        ctx(backlog=None, current_replicas=current, state=state, policy={"scale_to_zero": True})
    )
    assert d.metrics_stale and d.reason is Reason.METRICS_STALE
    assert d.desired_replicas == current
    assert d.state == state  # a stale tick neither opens nor closes a window


def test_stale_metric_still_respects_bounds() -> None:
    d = decide(ctx(backlog=None, current_replicas=14))
    assert d.desired_replicas == 10 and d.metrics_stale


def test_scale_down_waits_for_the_window() -> None:
    policy = replace(POLICY, scale_down_window_s=60)
    series = [100] * 3 + [0] * 30  # 10 replicas, then idle; ticks every 5 s
    replicas = replay(series, policy, start=1)
    assert replicas[2] >= 9
    first_down = next(i for i, r in enumerate(replicas) if i > 2 and r < replicas[2])
    # the last high recommendation was at t=10 s; down only once it left the 60 s window
    assert first_down * 5.0 > 10 + 60
    assert replicas[-1] == 1


def test_scale_up_window_takes_the_lowest_recommendation() -> None:
    policy = replace(POLICY, scale_up_window_s=12, scale_down_window_s=0)
    replicas = replay([1, 100, 100, 100, 100], policy, start=1)
    # a single burst does not scale up; a burst lasting the whole window does
    assert replicas[:3] == [1, 1, 1]
    assert replicas[3] > 1


def test_hold_inside_the_down_window_is_reported() -> None:
    state = ScalingState(recommendations=(Recommendation(-30.0, 6),), started_at=-1000.0)
    d = decide(ctx(backlog=10, current_replicas=6, state=state))
    assert d.desired_replicas == 6 and d.reason is Reason.HOLD_WINDOW


def test_restart_never_scales_down_before_a_full_window() -> None:
    # Fresh state (an operator restart): 8 replicas running, backlog now tiny.
    policy = replace(POLICY, scale_down_window_s=60)
    replicas = replay([5] * 20, policy, start=8)
    assert replicas[:12] == [8] * 12  # t = 0..55 s: inside the first window
    assert replicas[-1] == 1


def test_scale_to_zero_and_back() -> None:
    policy = replace(POLICY, scale_to_zero=True, scale_down_window_s=20, activation_backlog=5)
    series = [0, 3, 6, 40, 40, 0, 0, 0, 0, 0, 0, 0, 4, 4, 50]
    replicas = replay(series, policy, start=0)
    assert replicas[:2] == [0, 0]  # below activation: stay asleep
    assert replicas[2] == 1  # wake up
    assert replicas[4] == 4
    assert 0 in replicas[5:12]  # idle long enough: back to zero
    assert replicas[12:14] == [0, 0]  # 4 <= activation: stay asleep
    assert replicas[14] == 4  # a burst wakes it again (step limit 4)


def test_no_oscillation_on_a_noisy_backlog() -> None:
    rng = random.Random(7)
    # ~1 h at 5 s ticks around 100 +- 25% (so ceil(b/10) jitters between 8 and 13)
    series = [int(100 * (1 + rng.uniform(-0.25, 0.25))) for _ in range(720)]
    policy = replace(POLICY, max_replicas=20, scale_down_window_s=300)
    replicas = replay(series, policy, start=1)
    changes = sum(1 for a, b in itertools.pairwise(replicas) if a != b)
    assert changes <= 6, changes  # a few steps up, then it holds the window's max
    # without the down window the same series flaps constantly: the test can fail
    flappy = replay(series, replace(policy, scale_down_window_s=0), start=1)
    assert sum(1 for a, b in itertools.pairwise(flappy) if a != b) > 100


def test_state_is_bounded_by_the_longest_window() -> None:
    policy = replace(POLICY, scale_up_window_s=10, scale_down_window_s=30)
    state = ScalingState()
    for i in range(1000):
        state = decide(
            ScalingContext(
                now=i * 1.0, backlog=i % 50, current_replicas=3, policy=policy, state=state
            )
        ).state
    assert len(state.recommendations) <= 31


def test_last_scale_time_moves_only_on_change() -> None:
    d1 = decide(ctx(now=100.0, backlog=50, current_replicas=1))
    assert d1.state.last_scale_time == 100.0 and d1.direction == "up"
    d2 = decide(ctx(now=105.0, backlog=50, current_replicas=5, state=d1.state))
    assert d2.state.last_scale_time == 100.0 and d2.direction == "none"


@pytest.mark.parametrize(
    ("backlog", "tolerance", "desired"),
    [
        # 10 replicas x target 10 = 100 is "at target"; +-10% changes nothing
        (110, 0.1, 10),
        (111, 0.1, 12),  # ratio 1.11: outside, straight to ceil(111 / 10)
        (90, 0.1, 10),
        (89, 0.1, 9),  # settled history, no down window left: down at once
        (101, 0.0, 11),  # no tolerance: every replica's worth of backlog counts
        (0, 0.5, 1),  # an empty queue is outside any tolerance below 1
    ],
)
def test_tolerance_holds_near_target(backlog: int, tolerance: float, desired: int) -> None:
    policy = {"tolerance": tolerance, "scale_down_window_s": 0, "max_replicas": 20}
    d = decide(ctx(backlog=backlog, current_replicas=10, policy=policy))
    assert d.desired_replicas == desired, d.message
    if desired == 10:
        assert d.reason is Reason.STEADY and "within tolerance" in d.message
        # what the windows remember is the held count, not the noisy raw one
        assert d.state.recommendations[-1].replicas == 10


def test_tolerance_does_not_block_waking_from_zero() -> None:
    d = decide(ctx(backlog=6, current_replicas=0, policy={"scale_to_zero": True, "tolerance": 0.5}))
    assert d.desired_replicas == 1 and d.reason is Reason.ACTIVATE


@pytest.mark.parametrize(
    ("window", "desired"),
    [
        (30.0, 4),  # t=-20 (6), t=-10 (4), now (9): the lowest is 4
        (15.0, 4),  # t=-10 (4), now (9)
        (5.0, 6),  # only now (9), then the step limit: 2 + 4
    ],
)
def test_scale_up_goes_to_the_lowest_recommendation_in_the_window(
    window: float, desired: int
) -> None:
    recs = (Recommendation(-20.0, 6), Recommendation(-10.0, 4))
    state = ScalingState(recommendations=recs, started_at=-1000.0)
    d = decide(
        ctx(
            backlog=90,
            current_replicas=2,
            state=state,
            policy={"scale_up_window_s": window, "scale_down_window_s": 0, "tolerance": 0},
        )
    )
    assert d.desired_replicas == desired, d.message


def test_a_noisy_steady_load_settles_in_few_changes() -> None:
    """Around a steady load L with noise +-d, replicas c are quiet (every tick inside
    tolerance) once (L+d) <= (1+tol) target c and (L-d) >= (1-tol) target c. With
    d <= L tol / (2 + tol), (L-d)(1+tol) >= L+d, so any count the policy lands on
    from below (>= ceil((L-d) / target)) is already quiet, and below the quiet band no
    tick asks for less. So from `start` the policy makes at most ceil((lo - start) /
    step) full steps plus one landing, all upward, and none after: a bound from the
    policy alone, whatever the seed."""
    tol, load, start = 0.1, 1000, 1
    d = math.floor(load * tol / (2 + tol))
    # no scale-down window at all: only the tolerance keeps it still
    policy = replace(POLICY, max_replicas=200, scale_down_window_s=0, tolerance=tol)
    rng = random.Random(11)
    series = [rng.randint(load - d, load + d) for _ in range(720)]
    replicas = replay(series, policy, start=start)
    target = policy.target_backlog
    lo = math.ceil((load + d) / ((1 + tol) * target))
    changes = [(x, y) for x, y in itertools.pairwise([start, *replicas]) if x != y]
    assert len(changes) <= math.ceil((lo - start) / STEP) + 1, changes
    assert all(y > x for x, y in changes)
    assert lo <= replicas[-1] <= (load - d) / ((1 - tol) * target)
    # the same series with no tolerance flaps on most ticks: the bound can fail
    flappy = replay(series, replace(policy, tolerance=0.0), start=start)
    assert sum(1 for x, y in itertools.pairwise(flappy) if x != y) > 100
