"""decide()'s HPA-style scale policies (rule 7, scalelimits.py): pure, no mocks.

Each case is checked against the HPA's arithmetic by hand: a period starts from
the replicas now less what that direction changed strictly inside the period.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from tagpipe_operator.scalelimits import (
    DEFAULT_SCALE_UP,
    PolicyType,
    RatePolicy,
    ScaleEvent,
    ScaleRules,
    Select,
    parse_rules,
)
from tagpipe_operator.scaling import ScalingContext, ScalingPolicy, ScalingState, decide

PODS4 = RatePolicy(PolicyType.PODS, 4, 15.0)
PCT100 = RatePolicy(PolicyType.PERCENT, 100, 15.0)
POLICY = ScalingPolicy(
    min_replicas=1, max_replicas=1000, target_backlog=10, scale_down_window_s=0, tolerance=0
)
SETTLED = ScalingState(started_at=-1000.0)


def up(*policies: RatePolicy, select: Select = Select.MAX, **kw: Any) -> int:
    """Desired replicas for a backlog that wants 400, from 10 unless told."""
    policy = replace(POLICY, scale_up=ScaleRules(policies, select))
    base: dict[str, Any] = {"now": 0.0, "backlog": 4000, "current_replicas": 10, "state": SETTLED}
    return decide(ScalingContext(policy=policy, **{**base, **kw})).desired_replicas


def down(*policies: RatePolicy, select: Select = Select.MAX, **kw: Any) -> int:
    """Desired replicas for a backlog that wants 2, from 20 unless told."""
    policy = replace(POLICY, scale_down=ScaleRules(policies, select))
    base: dict[str, Any] = {"now": 0.0, "backlog": 20, "current_replicas": 20, "state": SETTLED}
    return decide(ScalingContext(policy=policy, **{**base, **kw})).desired_replicas


@pytest.mark.parametrize(
    ("policies", "select", "desired"),
    [
        ((PODS4,), Select.MAX, 14),
        ((PCT100,), Select.MAX, 20),
        ((RatePolicy(PolicyType.PERCENT, 55, 15.0),), Select.MAX, 16),  # ceil(15.5)
        ((PODS4, PCT100), Select.MAX, 20),  # the larger change
        ((PODS4, PCT100), Select.MIN, 14),  # the smaller change
        ((PODS4, PCT100), Select.DISABLED, 10),  # no scale-up at all
    ],
)
def test_scale_up_policies(policies: tuple[RatePolicy, ...], select: Select, desired: int) -> None:
    assert up(*policies, select=select) == desired


def test_scale_up_limit_sets_scaling_limited() -> None:
    policy = replace(POLICY, scale_up=ScaleRules((PODS4,)))
    d = decide(ScalingContext(0.0, 4000, 10, policy, SETTLED))
    assert d.scaling_limited and "scale-up policies" in d.message


@pytest.mark.parametrize(
    ("event_at", "desired"),
    [
        (-10.0, 20),  # +10 inside the 15 s period: it started at 10, 100 % of it is 20
        (-15.0, 40),  # exactly one period ago: outside (strictly after the cutoff)
    ],
)
def test_a_period_counts_from_its_start(event_at: float, desired: int) -> None:
    state = replace(SETTLED, events=(ScaleEvent(event_at, 10),))
    assert up(PCT100, current_replicas=20, state=state) == desired


def test_scale_down_events_do_not_limit_scale_up() -> None:
    state = replace(SETTLED, events=(ScaleEvent(-5.0, -3),))
    assert up(PCT100, current_replicas=10, state=state) == 20


@pytest.mark.parametrize(
    ("ready", "min_replicas", "desired"),
    [
        (None, 1, 20),  # readiness unknown: count every replica
        (10, 1, 20),
        (4, 1, 10),  # 6 Pending: 100 % of 4 is 8, below what runs: hold
        (0, 1, 10),  # all Pending (no free GPU): hold, never add to Pending pods
        (0, 8, 16),  # the floor always counts: min 8 Pending pods may double once
    ],
)
def test_scale_up_counts_from_ready_pods(
    ready: int | None, min_replicas: int, desired: int
) -> None:
    policy = replace(POLICY, min_replicas=min_replicas, scale_up=ScaleRules((PCT100,)))
    d = decide(ScalingContext(0.0, 4000, 10, policy, SETTLED, ready_replicas=ready))
    assert d.desired_replicas == desired, d.message


@pytest.mark.parametrize(
    ("policies", "select", "desired"),
    [
        ((RatePolicy(PolicyType.PERCENT, 100, 15.0),), Select.MAX, 2),
        ((RatePolicy(PolicyType.PERCENT, 50, 60.0),), Select.MAX, 10),
        ((RatePolicy(PolicyType.PERCENT, 33, 60.0),), Select.MAX, 13),  # int(13.4): truncated
        ((RatePolicy(PolicyType.PODS, 3, 60.0),), Select.MAX, 17),
        (
            (RatePolicy(PolicyType.PODS, 3, 60.0), RatePolicy(PolicyType.PERCENT, 50, 60.0)),
            Select.MAX,
            10,
        ),
        (
            (RatePolicy(PolicyType.PODS, 3, 60.0), RatePolicy(PolicyType.PERCENT, 50, 60.0)),
            Select.MIN,
            17,
        ),
        ((RatePolicy(PolicyType.PERCENT, 100, 15.0),), Select.DISABLED, 20),
    ],
)
def test_scale_down_policies(
    policies: tuple[RatePolicy, ...], select: Select, desired: int
) -> None:
    assert down(*policies, select=select) == desired


def test_scale_down_period_counts_what_it_already_removed() -> None:
    # 5 removed 30 s ago: the 60 s period started at 25, and 50 % of 25 is 12.
    state = replace(SETTLED, events=(ScaleEvent(-30.0, -5),))
    assert down(RatePolicy(PolicyType.PERCENT, 50, 60.0), state=state) == 12


def test_defaults_take_a_tier_from_130_to_400_in_two_decisions() -> None:
    # The HPA's default (the larger of 4 pods or 100 % per 15 s), pods ready in time.
    policy = replace(POLICY, scale_up=DEFAULT_SCALE_UP)
    state, current, path = SETTLED, 130, []
    for now in (0.0, 15.0):
        d = decide(ScalingContext(now, 4000, current, policy, state, ready_replicas=current))
        state, current = d.state, d.desired_replicas
        path.append(current)
    assert path == [260, 400]


def test_events_are_kept_only_for_the_longest_period() -> None:
    policy = replace(POLICY, scale_up=DEFAULT_SCALE_UP)
    state, current = SETTLED, 1
    for i in range(100):
        backlog = 4000 if i % 2 == 0 else 10
        d = decide(ScalingContext(i * 10.0, backlog, current, policy, state))
        state, current = d.state, d.desired_replicas
    assert all(e.at > 990.0 - 15.0 for e in state.events)


def test_parse_rules() -> None:
    assert parse_rules("Pods:4:10, Percent:100") == ScaleRules(
        (RatePolicy(PolicyType.PODS, 4, 10.0), RatePolicy(PolicyType.PERCENT, 100, 15.0))
    )
    assert parse_rules("", "Disabled").select is Select.DISABLED
    with pytest.raises(ValueError):
        parse_rules("Step:4")
