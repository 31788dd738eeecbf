"""Real-time admission by expected wait: the drain rate and the verdict, as pure functions."""

from __future__ import annotations

import math

import pytest
from tagpipe_gateway.admission import DrainRate, Reading, admit, bulk_limit
from tagpipe_gateway.early import deadline_of


def feed(rate: DrainRate, *readings: tuple[float, int, int]) -> DrainRate:
    for at, completed, backlog in readings:
        rate.observe(Reading(at, completed, backlog))
    return rate


def test_no_rate_before_a_busy_stretch_of_min_span() -> None:
    r = feed(DrainRate(window_s=5, min_span_s=1.0), (0.0, 0, 10), (0.5, 20, 10))
    assert r.rate is None
    feed(r, (1.0, 40, 10))
    assert r.rate == pytest.approx(40.0)


def test_a_new_busy_stretch_uses_the_last_ones_rate_until_it_has_its_own() -> None:
    r = feed(DrainRate(window_s=5), (0, 0, 30), (1, 80, 30), (2, 160, 30))
    assert r.rate == pytest.approx(80.0)
    feed(r, (3, 170, 0))  # idle: that stretch is over
    assert r.rate == pytest.approx(80.0)  # never unknown again: a burst is not admitted blind
    feed(r, (10, 170, 50), (10.5, 171, 60))  # a new stretch, under a second old
    assert r.rate == pytest.approx(80.0)
    feed(r, (11, 180, 70))  # its own second: a quiet stretch stands for itself
    assert r.rate == pytest.approx(10.0)
    feed(r, (12, 180, 0), (13, 180, 40), (14, 280, 40))  # and is replaced in turn
    assert r.rate == pytest.approx(100.0)


def test_the_window_slides() -> None:
    r = DrainRate(window_s=5, min_span_s=1)
    for t in range(0, 10):  # 100/s
        r.observe(Reading(float(t), 100 * t, 500))
    for t in range(10, 20):  # then 10/s
        r.observe(Reading(float(t), 900 + 10 * (t - 9), 500))
    assert r.rate == pytest.approx(10.0)


def test_a_counter_going_backwards_restarts_the_window() -> None:
    r = feed(DrainRate(), (0, 1000, 5), (1, 1100, 5))
    assert r.rate == pytest.approx(100.0)
    feed(r, (2, 3, 5), (3, 23, 5))  # streams recreated
    assert r.rate == pytest.approx(20.0)


def test_nothing_ahead_or_no_measurement_admits() -> None:
    assert admit(ahead=0, items=1, rate=0.5, deadline_s=0.1).admit
    v = admit(ahead=10_000, items=1, rate=None, deadline_s=1.0)
    assert v.admit and v.expected_wait_s is None  # the fixed limits are the ceiling then


def test_refuses_when_the_expected_wait_exceeds_the_deadline() -> None:
    ok = admit(ahead=40, items=4, rate=50.0, deadline_s=1.0)
    assert ok.admit and ok.expected_wait_s == pytest.approx(43 / 50)
    no = admit(ahead=200, items=4, rate=50.0, deadline_s=1.0)
    assert not no.admit and no.expected_wait_s == pytest.approx(203 / 50)
    assert no.retry_after_s == math.ceil(203 / 50 - 1.0)


def test_admits_again_as_the_backlog_drains() -> None:
    verdicts = [admit(ahead, 1, rate=50.0, deadline_s=1.0).admit for ahead in (300, 100, 50)]
    assert verdicts == [False, False, True]


def test_a_stalled_pipeline_admits_nothing_behind_a_queue() -> None:
    v = admit(ahead=5, items=1, rate=0.0, deadline_s=2.0)
    assert not v.admit and v.retry_after_s == 2


@pytest.mark.parametrize(
    ("query", "deadline_s"),
    [
        (b"", 2.0),  # none asked for: the gateway's default
        (b"top_k=3", 2.0),
        (b"timeout_ms=250", 0.25),
        (b"top_k=3&timeout_ms=30000", 30.0),
        # Left to the route, which answers 422 naming the field:
        (b"timeout_ms=30001", None),
        (b"timeout_ms=0", None),
        (b"timeout_ms=soon", None),
        (b"timeout_ms=", None),
    ],
)
def test_the_early_check_reads_the_deadline_from_the_query_alone(
    query: bytes, deadline_s: float | None
) -> None:
    assert deadline_of(query, default_s=2.0, most_s=30.0) == deadline_s


@pytest.mark.parametrize(
    ("rate", "floor", "want"),
    [
        (None, 2000, 2000),  # nothing measured yet: the floor
        (0.0, 2000, 2000),  # a stalled pipeline cannot fill the streams
        (66.0, 2000, 2000),  # this box: about the old fixed limit
        (6250.0, 2000, 187_500),  # the fleet at peak: 30 s of its drain
        (6250.0, 500_000, 500_000),
    ],
)
def test_the_bulk_limit_follows_the_drain_rate(rate: float | None, floor: int, want: int) -> None:
    assert bulk_limit(rate, 30.0, floor) == want


def test_the_bulk_limit_holds_every_slot_of_a_big_tier_by_littles_law() -> None:
    # 114 downloaders x 32 slots at 1.5 s per item drain ~2,430/s; the old fixed
    # 2,000 held fewer items than the tier has slots.
    slots, latency_s = 114 * 32, 1.5
    assert bulk_limit(slots / latency_s, 30.0, 2000) >= slots
