"""decide()'s rate term (rule 2) and the rate meter that feeds it: pure, no mocks.

A replica here has 4 slots; 40 messages in service at 100 completions/s is 0.4 s
a message, so one replica sustains 4 / 0.4 = 10/s (Little's law).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from tagpipe_operator.ratemeter import Counters, MeterState, RateReading, observe, rates
from tagpipe_operator.scalelimits import PolicyType, RatePolicy, ScaleRules
from tagpipe_operator.scaling import (
    Reason,
    ScalingContext,
    ScalingPolicy,
    ScalingState,
    decide,
    replica_capacity,
)

POLICY = ScalingPolicy(
    min_replicas=1,
    max_replicas=200,
    target_backlog=10,
    scale_down_window_s=0,
    in_flight_per_replica=4,
    target_utilization=1.0,
    drain_s=60.0,
    rate_window_s=30.0,
    backlog_floor=False,
    scale_up=ScaleRules((RatePolicy(PolicyType.PODS, 1000, 15.0),)),  # no limit here
)
SETTLED = ScalingState(started_at=-1000.0)


def reading(**overrides: Any) -> RateReading:
    base: dict[str, Any] = {
        "measured_at": 0.0,
        "arrival_per_s": 100.0,
        "completed_per_s": 100.0,
        "queued": 0,
        "in_service": 40.0,
    }
    return RateReading(**{**base, **overrides})


def ctx(**overrides: Any) -> ScalingContext:
    policy = replace(POLICY, **overrides.pop("policy", {}))
    base: dict[str, Any] = {
        "now": 0.0,
        "backlog": 40,
        "current_replicas": 10,
        "state": SETTLED,
        "rates": reading(),
    }
    return ScalingContext(policy=policy, **{**base, **overrides})


def test_capacity_is_littles_law() -> None:
    assert replica_capacity(reading(), 4) == pytest.approx(10.0)


def test_steady_traffic_at_capacity_holds() -> None:
    d = decide(ctx())
    assert d.rate_based and d.desired_replicas == 10 and d.reason is Reason.STEADY, d.message


def test_idle_slots_scale_down_where_the_backlog_rule_would_not() -> None:
    # 20 replicas, 50/s arriving, 20 in service: 10/s each, 5 replicas do it. The same
    # backlog (20) under the backlog rule (target 1 per replica) would keep all 20.
    r = reading(arrival_per_s=50.0, completed_per_s=50.0, in_service=20.0)
    d = decide(ctx(current_replicas=20, backlog=20, rates=r, policy={"target_backlog": 1}))
    assert (d.desired_replicas, d.reason) == (5, Reason.SCALE_DOWN), d.message
    off = decide(
        ctx(
            current_replicas=20,
            backlog=20,
            rates=r,
            policy={"target_backlog": 1, "in_flight_per_replica": None},
        )
    )
    assert off.desired_replicas == 20 and not off.rate_based


def test_target_utilization_and_drain_term() -> None:
    # 100/s at 80 % of 10/s -> 12.5; 600 queued over 60 s adds 10/s -> 13.75 -> 14
    r = reading(queued=600)
    d = decide(ctx(rates=r, policy={"target_utilization": 0.8}))
    assert d.recommended_replicas == 14, d.message
    assert "queued 600" in d.message


def test_zero_traffic_falls_to_the_floor() -> None:
    r = reading(arrival_per_s=0.0, completed_per_s=0.0, in_service=0.0)
    d = decide(ctx(backlog=0, current_replicas=6, rates=r))
    assert d.desired_replicas == 1 and not d.rate_based, d.message


def test_no_completions_yet_uses_the_backlog_rule() -> None:
    # Work arrives but nothing has completed: no capacity to divide by, so the
    # backlog rule decides (ceil(35 / 10) = 4), not a division by zero or max.
    r = reading(arrival_per_s=500.0, completed_per_s=0.0, in_service=30.0)
    d = decide(ctx(backlog=35, current_replicas=2, rates=r))
    assert d.desired_replicas == 4 and not d.rate_based
    assert "rates stale or none yet" in d.message
    assert decide(ctx(backlog=35, current_replicas=2, rates=None)).desired_replicas == 4


@pytest.mark.parametrize(("age", "rate_based"), [(30.0, True), (30.5, False), (600.0, False)])
def test_a_stale_rate_falls_back_to_the_backlog_rule(age: float, rate_based: bool) -> None:
    # A burst seen long ago must not size the stage now: never jump to max.
    r = reading(measured_at=-age, arrival_per_s=1_000_000.0)
    d = decide(ctx(backlog=35, current_replicas=2, rates=r))
    assert d.rate_based is rate_based, d.message
    if not rate_based:
        assert d.desired_replicas == 4 and not d.scaling_limited
    else:
        assert d.desired_replicas == 200 and d.scaling_limited


def test_a_burst_is_sized_in_one_decision_before_the_backlog_builds() -> None:
    # Arrivals jump 6x; the queue is still small. The backlog rule sees 50 / 10 = 5,
    # the rate term the whole need, and 100 % per period lets it double at once.
    policy = {
        "scale_up": ScaleRules(
            (RatePolicy(PolicyType.PODS, 4, 15.0), RatePolicy(PolicyType.PERCENT, 100, 15.0))
        )
    }
    r = reading(arrival_per_s=600.0, queued=10)
    d = decide(ctx(backlog=50, rates=r, policy=policy))
    assert d.recommended_replicas == 61  # (600 + 10/60) / 10 = 60.02 -> 61
    assert d.desired_replicas == 20 and d.scaling_limited  # 10 + 100 %
    backlog_only = decide(ctx(backlog=50, rates=None, policy=policy))
    assert backlog_only.desired_replicas == 5  # the backlog rule even scales it down


@pytest.mark.parametrize(("floor", "desired"), [(True, 30), (False, 10)])
def test_backlog_floor(floor: bool, desired: int) -> None:
    # Rates say 10 replicas; a backlog of 300 says 30 when it is kept as a floor.
    d = decide(ctx(backlog=300, policy={"backlog_floor": floor}))
    assert d.desired_replicas == desired, d.message


def test_tolerance_applies_to_the_rate_term() -> None:
    r = reading(arrival_per_s=108.0)  # 10.8 replicas wanted against 10: inside 10 %
    d = decide(ctx(rates=r))
    assert d.desired_replicas == 10 and "within tolerance" in d.message
    d = decide(ctx(rates=reading(arrival_per_s=112.0)))
    assert d.desired_replicas == 12


def test_scale_to_zero_still_sleeps_on_an_empty_backlog() -> None:
    # Rates still remember the last window's traffic, but nothing is left: go idle.
    d = decide(ctx(backlog=0, current_replicas=3, policy={"scale_to_zero": True}))
    assert (d.desired_replicas, d.reason) == (0, Reason.IDLE)


# -- the rate meter ---------------------------------------------------------------


def _feed(samples: Sequence[Counters | None], window: float = 30.0) -> RateReading | None:
    state, out = MeterState(), None
    for s in samples:
        state, out = observe(state, s, window)
    return out


def _c(at: float, arrived: int, completed: int, in_service: int = 8, queued: int = 0) -> Counters:
    return Counters(at, arrived, completed, queued, in_service)


def test_meter_needs_two_readings() -> None:
    assert _feed([_c(0, 100, 90)]) is None


def test_meter_rates_over_the_window() -> None:
    samples = [_c(t, 100 * t, 90 * t, in_service=t) for t in range(0, 101, 10)]
    r = _feed(samples)
    assert r is not None and r.measured_at == 100
    assert r.arrival_per_s == pytest.approx(100.0)
    assert r.completed_per_s == pytest.approx(90.0)
    assert r.in_service == pytest.approx((80 + 90 + 100) / 3)  # the window's, not the anchor's


def test_meter_state_is_bounded_by_the_window() -> None:
    state = MeterState()
    for t in range(0, 1000, 5):
        state, _ = observe(state, _c(t, t, t), 30.0)
    assert len(state.readings) <= 30 // 5 + 1


def test_a_failed_read_keeps_the_last_reading_time() -> None:
    state, first = MeterState(), None
    for s in [_c(0, 0, 0), _c(10, 1000, 900)]:
        state, first = observe(state, s, 30.0)
    state2, again = observe(state, None, 30.0)
    assert state2 == state and again == first and again is not None and again.measured_at == 10
    # and decide() then treats it as stale once the window has passed
    d = decide(ctx(now=41.0, backlog=35, current_replicas=2, rates=again))
    assert not d.rate_based


def test_a_counter_reset_restarts_the_window() -> None:
    # The stream was deleted and recreated: sequences start again from 0.
    r = _feed([_c(0, 5000, 5000), _c(10, 6000, 6000), _c(20, 10, 5)])
    assert r is None
    assert rates(MeterState((_c(20, 10, 5), _c(30, 110, 105)))) is not None
