"""`tagpipe simulate`: replay a traffic trace through the operator's own policy.

The model is a fluid queue per stage on a coarse tick (default 10 s): images
arrive, wait in the stage's JetStream queue, and `ready` replicas serve them at
a measured per-replica rate. Every tick, for every stage, the simulator calls
`tagpipe_operator.scaling.decide` -- the function the operator's timer calls --
with the backlog the operator would read (pending + ack-pending) and applies the
decision with a pod start-up delay. Counts are integers so conservation is exact.

What the operator reads as backlog matters: a busy replica holds `in_flight`
fetched-but-unacked messages, which KEDA-style lag counts (notes: "messages
fetched but not yet acked count as lag"). By Little's law the in-service count
is throughput x in_flight / per-replica rate, and that is added to the queue.

The rate term reads what the operator reads: the stage's cumulative arrivals
(the stream's last sequence), completions (acked), queue and in-service counts,
turned into rates over the policy's window by the operator's own
`ratemeter.observe`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tagpipe_operator.ratemeter import Counters, MeterState, observe
from tagpipe_operator.scalelimits import parse_rules
from tagpipe_operator.scaling import ScalingContext, ScalingPolicy, ScalingState, decide
from tagpipe_operator.spec import DownloaderSpec, InferenceSpec

from tagpipe_cli import rates as rates_mod
from tagpipe_cli import simreport
from tagpipe_cli.plan import mixed_rate, parse_mix
from tagpipe_cli.traces import Trace
from tagpipe_cli.traces import load as load_trace

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class StageModel:
    name: str
    per_replica: float  # images/s one ready replica serves
    startup_s: float  # scheduling + image pull + model load until Ready
    policy: ScalingPolicy
    in_flight: int = 16  # messages a busy replica holds unacked
    initial_replicas: int | None = None  # default: the policy floor


@dataclass
class StageSeries:
    """Per-tick records for one stage (end of tick)."""

    name: str
    backlog: IntArray  # queued, not yet served
    signal: IntArray  # what decide() was given: queue + in-flight
    served: IntArray
    desired: IntArray  # spec.replicas after the decision (pods billed)
    ready: IntArray
    scale_events: int = 0
    reversals: int = 0  # up after down or down after up: oscillation


@dataclass(frozen=True)
class SimResult:
    trace: Trace
    stages: list[StageSeries]
    latency_target_s: float
    head_age_s: npt.NDArray[np.float64] = field(repr=False)

    @property
    def completed(self) -> int:
        return int(self.stages[-1].served.sum())

    @property
    def queued_at_end(self) -> int:
        return sum(int(s.backlog[-1]) for s in self.stages)


class _Pods:
    """Ready pods plus pods still starting, each batch with its ready time."""

    def __init__(self, ready: int) -> None:
        self.ready = ready
        self.starting: deque[list[float]] = deque()  # [ready_at, count], oldest first

    @property
    def total(self) -> int:
        return self.ready + int(sum(c for _, c in self.starting))

    def advance(self, now: float) -> None:
        while self.starting and self.starting[0][0] <= now:
            self.ready += int(self.starting.popleft()[1])

    def scale_to(self, desired: int, now: float, startup_s: float) -> None:
        diff = desired - self.total
        if diff > 0:
            self.starting.append([now + startup_s, float(diff)])
            return
        # Scale-down removes not-yet-ready pods first, as the ReplicaSet controller does.
        remove = -diff
        while remove and self.starting:
            batch = self.starting[-1]
            take = min(remove, int(batch[1]))
            batch[1] -= take
            remove -= take
            if batch[1] == 0:
                self.starting.pop()
        self.ready -= remove


def _run_stage_tick(
    model: StageModel, pods: _Pods, queue: int, carry: float, tick_s: float
) -> tuple[int, int, float]:
    """Serve one tick. Returns (served, queue left, capacity carried to the next tick).

    Fractional capacity is carried only while the queue is the limit of nothing,
    so a slow replica count still serves the right long-run rate.
    """
    capacity = pods.ready * model.per_replica * tick_s + carry
    whole = int(capacity)
    served = min(queue, whole)
    carry = capacity - whole if served == whole else 0.0
    return served, queue - served, carry


def _zeros(n: int) -> IntArray:
    return np.zeros(n, dtype=np.int64)


def simulate(trace: Trace, stages: list[StageModel], latency_target_s: float = 60.0) -> SimResult:
    n, dt = len(trace.arrivals), trace.tick_s
    pods = [_Pods(m.initial_replicas or m.policy.floor) for m in stages]
    states = [ScalingState() for _ in stages]
    queues = [0] * len(stages)
    carries = [0.0] * len(stages)
    last_dir = [0] * len(stages)
    out = [
        StageSeries(m.name, _zeros(n), _zeros(n), _zeros(n), _zeros(n), _zeros(n)) for m in stages
    ]
    arrivals = trace.arrivals.tolist()  # python ints: the loop is scalar work
    meters = [MeterState() for _ in stages]
    arrived, completed = [0] * len(stages), [0] * len(stages)
    for t in range(n):
        now = (t + 1) * dt
        inflow = int(arrivals[t])
        for i, m in enumerate(stages):
            p = pods[i]
            p.advance(now - dt)
            queues[i] += inflow
            served, queues[i], carries[i] = _run_stage_tick(m, p, queues[i], carries[i], dt)
            arrived[i] += inflow
            completed[i] += served
            in_service = min(
                math.ceil(served / dt * m.in_flight / m.per_replica), p.ready * m.in_flight
            )
            signal = queues[i] + in_service
            reading = Counters(now, arrived[i], completed[i], queues[i], in_service)
            meters[i], rates = observe(meters[i], reading, m.policy.rate_window_s)
            decision = decide(
                ScalingContext(
                    now, signal, p.total, m.policy, states[i], ready_replicas=p.ready, rates=rates
                )
            )
            states[i] = decision.state
            s = out[i]
            if decision.changed:
                s.scale_events += 1
                direction = 1 if decision.desired_replicas > p.total else -1
                s.reversals += int(last_dir[i] == -direction)
                last_dir[i] = direction
                p.scale_to(decision.desired_replicas, now, m.startup_s)
            s.backlog[t], s.signal[t], s.served[t] = queues[i], signal, served
            s.desired[t], s.ready[t] = p.total, p.ready
            inflow = served  # the next stage's input this tick
    return SimResult(trace, out, latency_target_s, _head_of_line_age(trace, out[-1].served))


def _head_of_line_age(trace: Trace, done: IntArray) -> npt.NDArray[np.float64]:
    """Age of the oldest image not yet through the pipeline, at each tick's end.

    Both stages are FIFO, so the k-th completion is the k-th arrival: the oldest
    unfinished image is arrival number D(t), which arrived in the first tick
    whose cumulative arrivals exceed D(t).
    """
    arrived = np.cumsum(trace.arrivals)
    finished = np.cumsum(done)
    first_tick = np.searchsorted(arrived, finished, side="right")
    ticks = np.arange(len(arrived))
    age = (ticks - first_tick + 1) * trace.tick_s
    return np.where(finished < arrived, age, 0.0).astype(np.float64)


def summarise(res: SimResult, stages: list[StageModel]) -> dict[str, Any]:
    tr, dt = res.trace, res.trace.tick_s
    hours = tr.duration_s / 3600
    per_stage = []
    for m, s in zip(stages, res.stages, strict=True):
        static = math.ceil(tr.peak_rate / m.per_replica - 1e-9)
        # The fair comparison: static replicas with the same headroom the autoscaler keeps.
        util = min(1.0, m.policy.target_backlog / m.in_flight)
        static_hr = math.ceil(tr.peak_rate / (m.per_replica * util) - 1e-9)
        replica_hours = float(s.desired.sum()) * dt / 3600
        per_stage.append(
            {
                "stage": s.name,
                "per_replica_img_s": round(m.per_replica, 2),
                "peak_backlog": int(s.backlog.max()),
                "max_replicas": int(s.desired.max()),
                "replica_hours": round(replica_hours, 1),
                "static_peak_replicas": static,
                "static_replica_hours": round(static * hours, 1),
                "vs_static": round(replica_hours / (static * hours), 3),
                "static_headroom_replicas": static_hr,
                "static_headroom_replica_hours": round(static_hr * hours, 1),
                "vs_static_headroom": round(replica_hours / (static_hr * hours), 3),
                "scale_events": s.scale_events,
                "direction_reversals": s.reversals,
            }
        )
    over = res.head_age_s > res.latency_target_s
    return {
        "trace": tr.name,
        "tick_s": dt,
        "hours": round(hours, 2),
        "arrivals": tr.total,
        "completed": res.completed,
        "queued_at_end": res.queued_at_end,
        "peak_rate_img_s": round(tr.peak_rate, 1),
        "mean_rate_img_s": round(tr.mean_rate, 1),
        "latency_target_s": res.latency_target_s,
        "time_over_latency_target_s": float(over.sum() * dt),
        "max_head_of_line_age_s": float(res.head_age_s.max()),
        "stages": per_stage,
    }


def _cr_defaults() -> dict[str, tuple[ScalingPolicy, int]]:
    """The TagPipeline CR's default policy per stage, and what a busy replica holds
    unacked: the spec's own figure, which the rate term uses too (downloader: its
    download concurrency; inference: two batches, the worker's pipeline depth)."""
    out = {}
    for name, spec in (("downloader", DownloaderSpec()), ("inference", InferenceSpec())):
        in_flight = spec.in_flight_per_replica()
        assert in_flight is not None  # both stages have slots
        out[name] = (spec.scaling_policy(), in_flight)
    return out


def build_stages(args: argparse.Namespace, trace: Trace) -> list[StageModel]:
    """Stage models: the CR's default policies, changed only where a flag says so.

    max_replicas defaults to `--max-over-static` x the trace's peak need (the
    CR's defaults are sized for a demo, not for 500M/day). Replicas start where
    the trace's first minute needs them (the day before ran too), so a cold
    start doesn't pose as a peak.
    """
    stage_rates = rates_mod.resolve(args)
    dl_rate = mixed_rate({c: r.value for c, r in stage_rates.download.items()}, parse_mix(args.mix))
    inf_rate = (
        stage_rates.gpu_inference if args.inference == "t4" else stage_rates.cpu_inference
    ).value
    first_minute = float(trace.arrivals[: max(1, int(60 / trace.tick_s))].mean()) / trace.tick_s
    models = []
    for name, rate in (("downloader", dl_rate), ("inference", inf_rate)):
        base, in_flight = _cr_defaults()[name]
        in_flight = getattr(args, f"{name}_in_flight") or in_flight
        target = getattr(args, f"{name}_target_backlog") or base.target_backlog
        static = math.ceil(trace.peak_rate / rate)
        policy = replace(
            base,
            min_replicas=args.min_replicas or base.min_replicas,
            max_replicas=args.max_replicas or math.ceil(static * args.max_over_static),
            target_backlog=target,
            scale_down_window_s=_pick(args.scale_down_window_s, base.scale_down_window_s),
            scale_up_window_s=_pick(args.scale_up_window_s, base.scale_up_window_s),
            tolerance=_pick(args.tolerance, base.tolerance),
            **_policy_flags(args, base, in_flight),
        )
        warm = math.ceil(first_minute / (rate * min(1.0, target / in_flight)))
        initial = max(policy.floor, min(warm, policy.max_replicas))
        startup = getattr(args, f"{name}_startup_s")
        models.append(StageModel(name, rate, startup, policy, in_flight, initial))
    return models


def _pick(flag: float | None, default: float) -> float:
    return default if flag is None else flag


def _policy_flags(args: argparse.Namespace, base: ScalingPolicy, in_flight: int) -> dict[str, Any]:
    """The rate-term and scale-policy fields a flag changes (what-if runs only)."""
    up = base.scale_up
    if args.scale_up_policies is not None or args.scale_up_select is not None:
        up = parse_rules(args.scale_up_policies or "", args.scale_up_select or "Max")
    return {
        "scale_up": up,
        "in_flight_per_replica": None if args.no_rate_term else in_flight,
        "target_utilization": _pick(args.target_utilization, base.target_utilization),
        "drain_s": _pick(args.drain_s, base.drain_s),
        "rate_window_s": _pick(args.rate_window_s, base.rate_window_s),
    }


def with_policy(models: list[StageModel], **changes: Any) -> list[StageModel]:
    """The same stages with policy fields changed (what-if runs, tests)."""
    return [replace(m, policy=replace(m.policy, **changes)) for m in models]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("simulate", help="replay a traffic trace through the autoscaler")
    p.add_argument("--trace", default="diurnal", help="diurnal | burst | CSV file of t_s,rate")
    p.add_argument("--tick-s", type=float, default=10.0)
    p.add_argument("--mix", default="thumb=0.8,phone=0.2")
    p.add_argument("--inference", choices=("t4", "cpu"), default="t4")
    p.add_argument("--latency-target-s", type=float, default=60.0)
    p.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--png", type=Path, help="chart path (default bench/results/simulate-TRACE.png)")
    p.add_argument("--json", action="store_true")
    g = p.add_argument_group("policy (default: the TagPipeline CR's defaults per stage)")
    g.add_argument("--min-replicas", type=int)
    g.add_argument("--max-replicas", type=int)
    g.add_argument("--max-over-static", type=float, default=1.5, help="max = this x peak need")
    g.add_argument("--scale-up-window-s", type=float)
    g.add_argument("--scale-down-window-s", type=float)
    g.add_argument("--tolerance", type=float, help="no change within +-this of target")
    g.add_argument(
        "--scale-up-policies",
        help="TYPE:VALUE:PERIOD_S,... (Pods or Percent), e.g. Pods:4:10 for the old fixed step",
    )
    g.add_argument("--scale-up-select", choices=("Max", "Min", "Disabled"))
    g.add_argument("--no-rate-term", action="store_true", help="the backlog rule alone")
    g.add_argument("--target-utilization", type=float, help="rate term: share of capacity")
    g.add_argument("--drain-s", type=float, help="rate term: drain the queue within this")
    g.add_argument("--rate-window-s", type=float, help="rate term: measurement window")
    for stage, startup in (("downloader", 20.0), ("inference", 60.0)):
        g.add_argument(f"--{stage}-target-backlog", type=int, help="backlog per replica")
        g.add_argument(f"--{stage}-in-flight", type=int, help="unacked msgs per busy replica")
        g.add_argument(f"--{stage}-startup-s", type=float, default=startup, help="pod to Ready")
    rates_mod.add_rate_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        trace = load_trace(args.trace, tick_s=args.tick_s)
        models = build_stages(args, trace)
    except ValueError as exc:
        print(f"tagpipe simulate: {exc}")
        return 2
    res = simulate(trace, models, args.latency_target_s)
    summary = summarise(res, models)
    png = args.png or args.results_dir / f"simulate-{trace.name}.png"
    summary["chart"] = str(simreport.plot(res, png))
    print(json.dumps(summary, indent=2) if args.json else simreport.render(summary))
    return 0
