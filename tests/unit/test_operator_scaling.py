"""decide(): parametrized cases with no mocks, plus replayed series.

Contexts are built with `ctx(**overrides)` (as Ray Serve's tests do), and
series are replayed with `replay()`, the same loop a simulator runs.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from typing import Any

import pytest
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
    max_scale_up_step=4,
)
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
