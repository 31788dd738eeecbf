"""The traffic simulator: exact conservation, the built-in traces, and that it
really runs the operator's decide() (policy changes change the outcome)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tagpipe_cli import simulate as sim
from tagpipe_cli import traces
from tagpipe_cli.simulate import StageModel, simulate, summarise, with_policy
from tagpipe_operator.scalelimits import PolicyType, RatePolicy, ScaleRules
from tagpipe_operator.scaling import ScalingPolicy


def _stages(max_replicas: int = 50, step: int = 4, down_window: float = 300.0) -> list[StageModel]:
    def policy(target: int) -> ScalingPolicy:
        return ScalingPolicy(
            min_replicas=1,
            max_replicas=max_replicas,
            target_backlog=target,
            scale_down_window_s=down_window,
            # a fixed step per 15 s tick (the backlog rule alone: no in_flight_per_replica)
            scale_up=ScaleRules((RatePolicy(PolicyType.PODS, step, 15.0),)),
        )

    return [
        StageModel("downloader", 60.0, 20.0, policy(11), in_flight=16),
        StageModel("inference", 400.0, 60.0, policy(45), in_flight=64),
    ]


def _burst() -> traces.Trace:
    return traces.burst(
        tick_s=15.0, duration_s=4 * 3600, base_rate=500.0, burst_rate=3000.0, first_at_s=1800
    )


def _assert_conserved(trace: traces.Trace, res: sim.SimResult) -> None:
    inflow = trace.total
    for stage in res.stages:
        served = int(stage.served.sum())
        assert served + int(stage.backlog[-1]) == inflow  # exact: nothing lost, nothing invented
        inflow = served
    assert res.completed + res.queued_at_end == trace.total


def test_conservation_when_keeping_up() -> None:
    trace = _burst()
    res = simulate(trace, _stages())
    _assert_conserved(trace, res)


def test_conservation_with_work_left_queued() -> None:
    trace = _burst()
    res = simulate(trace, _stages(max_replicas=3))  # far too few: a backlog must remain
    assert res.queued_at_end > 0
    _assert_conserved(trace, res)


def test_diurnal_totals_500m_with_peak_over_6250() -> None:
    day = traces.diurnal(tick_s=10.0)
    assert day.total == 500_000_000
    assert day.duration_s == 86_400
    assert day.peak_rate >= 6250
    assert np.all(day.arrivals >= 0)
    # Trough in the early morning, crest in the afternoon.
    hourly = day.arrivals.reshape(24, -1).sum(axis=1)
    assert int(np.argmin(hourly)) in range(2, 7)
    assert int(np.argmax(hourly)) in range(14, 19)


def test_csv_trace_steps(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("t_s,rate\n0,100\n60,300\n120,0\n")
    tr = traces.from_csv(f, tick_s=30.0)
    assert tr.arrivals.tolist() == [3000, 3000, 9000, 9000, 0]
    with pytest.raises(ValueError, match="neither"):
        traces.load(str(tmp_path / "missing.csv"))


def test_policy_max_replicas_is_respected() -> None:
    res = simulate(_burst(), _stages(max_replicas=7))
    assert int(res.stages[0].desired.max()) == 7


def test_scale_up_step_changes_the_outcome() -> None:
    trace = _burst()
    slow = summarise(simulate(trace, _stages(step=1)), _stages(step=1))
    fast = summarise(simulate(trace, _stages(step=20)), _stages(step=20))
    # decide()'s scale-up policy limits each scale-up to `step` pods: a step of 1 builds a
    # far bigger queue in the burst than a step of 20.
    assert slow["stages"][0]["peak_backlog"] > 2 * fast["stages"][0]["peak_backlog"]
    assert slow["time_over_latency_target_s"] > fast["time_over_latency_target_s"]


def test_long_down_window_means_no_scale_down() -> None:
    stages = with_policy(_stages(), scale_down_window_s=10 * 86_400)
    res = simulate(_burst(), stages)
    for s in res.stages:
        assert np.all(np.diff(s.desired) >= 0)  # decide() held every scale-down
    short = simulate(_burst(), _stages(down_window=60.0))
    assert np.any(np.diff(short.stages[0].desired) < 0)


def test_cli_writes_chart_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    sim.add_parser(parser.add_subparsers())
    png = tmp_path / "b.png"
    args = parser.parse_args(
        [
            "simulate",
            "--trace",
            "burst",
            "--tick-s",
            "30",
            "--json",
            "--png",
            str(png),
            "--results-dir",
            str(tmp_path),
        ]
    )
    assert args.func(args) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["completed"] + out["queued_at_end"] == out["arrivals"]
    assert png.stat().st_size > 10_000
    assert [s["stage"] for s in out["stages"]] == ["downloader", "inference"]


def test_tolerance_from_the_cr_reaches_decide_and_damps_flapping() -> None:
    parser = argparse.ArgumentParser()
    sim.add_parser(parser.add_subparsers())
    day = traces.diurnal(tick_s=30.0)
    default = sim.build_stages(parser.parse_args(["simulate"]), day)
    off = sim.build_stages(parser.parse_args(["simulate", "--tolerance", "0"]), day)
    assert [m.policy.tolerance for m in default] == [0.1, 0.1]  # the CR's default
    assert [m.policy.tolerance for m in off] == [0.0, 0.0]
    dl = StageModel("downloader", 16.0, 20.0, _stages()[0].policy, in_flight=32)
    dl = replace(dl, policy=replace(dl.policy, max_replicas=1000, target_backlog=20))
    noisy, calm = (simulate(day, with_policy([dl], tolerance=t)) for t in (0.0, 0.1))
    # Every noisy tick above target adds a replica that the down window later removes;
    # a 10% band (wider than the trace's 3% tick noise) absorbs those ticks.
    assert noisy.stages[0].reversals > 10 * max(1, calm.stages[0].reversals)
    assert calm.stages[0].scale_events < noisy.stages[0].scale_events
    late = [summarise(r, [dl])["time_over_latency_target_s"] for r in (calm, noisy)]
    assert late[0] <= late[1]  # and no image waits longer for it


def _run(argv: list[str], trace: traces.Trace) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    sim.add_parser(parser.add_subparsers())
    models = sim.build_stages(parser.parse_args(["simulate", *argv]), trace)
    return summarise(simulate(trace, models), models)


def test_cr_defaults_meet_the_autoscaling_goals() -> None:
    """Issue 19's goals, on the CRD's defaults (the same objects the operator builds):
    a diurnal day at <= 0.70 of static-peak replica-hours per stage, nobody waiting
    over 60 s and no more reversals than the backlog rule made; bursts at least 5x
    less time over 60 s than the old fixed step, and no image older than 300 s."""
    day = _run([], traces.diurnal())
    assert day["time_over_latency_target_s"] == 0
    for stage, reversals in zip(day["stages"], (2, 10), strict=True):
        assert stage["vs_static"] <= 0.70, stage
        assert stage["direction_reversals"] <= reversals, stage
    burst, before = (_run(a, traces.burst()) for a in ([], OLD_POLICY))
    assert burst["completed"] == burst["arrivals"]
    assert before["time_over_latency_target_s"] >= 5 * burst["time_over_latency_target_s"] > 0
    assert burst["max_head_of_line_age_s"] <= 300


# The policy before issue 19, reproduced with flags: backlog rule, 4 pods per 10 s tick.
OLD_POLICY = ["--no-rate-term", "--scale-up-policies", "Pods:4:10"]


def test_the_old_policy_is_reproducible_with_flags() -> None:
    parser = argparse.ArgumentParser()
    sim.add_parser(parser.add_subparsers())
    old = sim.build_stages(parser.parse_args(["simulate", *OLD_POLICY]), traces.diurnal())
    assert all(m.policy.in_flight_per_replica is None for m in old)
    assert [p.value for p in old[0].policy.scale_up.policies] == [4]
