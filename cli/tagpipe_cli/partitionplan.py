"""`tagpipe plan`'s partitions: how many streams per stage (`spec.nats.partitions`)
keep each nats-server within a stated CPU budget at the planned peak.

Pure, from measurements: each stream's nats-server CPU per message and the share
its busiest server carries come from `make bench-streams`
(bench/results/streams.json), measured with the same message sizes `streamplan`
prints. A stage's partitions are the most of three needs:

- CPU: one stream's busiest server (its leader) carries `busiest_share` of the
  stream's nats-server CPU; N partitions whose leaders sit on different servers
  split it N ways, so N = ceil(busiest cores / budget);
- message rate: nats-server#7487 saw R3 work-queue streams degrade near 8,000
  msgs/s, and splitting them into several streams helped; an R3 (or more)
  stream is kept under `R3_MSGS_PER_S` (75 % of that);
- consumers: each consumer holds at most flowlimits.MAX_PER_CONSUMER unacked.

`spec.nats.partitions` is one number for both stages: the larger. The servers
line is the total nats-server CPU of every stream over the same budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tagpipe_cli.streamplan import StageFlow

DEFAULT_NATS_CORES_PER_NODE = 1.0
"""The budget when none is stated: one core of nats-server per node, next to
the workers that share the node."""

R3_MSGS_PER_S = 6000.0
"""Per replicated stream: 75 % of the ~8,000 msgs/s where nats-server#7487 saw
R3 work-queue streams degrade."""


@dataclass(frozen=True)
class StreamCost:
    us_per_msg: float  # nats-server CPU per message, all servers together
    busiest_share: float  # of that, what the busiest server (the leader) carries
    source: str


@dataclass(frozen=True)
class PartitionAdvice:
    stream: str
    cores: float  # nats-server CPU at peak, all servers, one unpartitioned stream
    busiest_cores: float  # of which the busiest server
    by_cpu: int
    by_rate: int
    by_consumers: int
    source: str

    @property
    def partitions(self) -> int:
        return max(self.by_cpu, self.by_rate, self.by_consumers)


def stream_costs(results_dir: Path, replicas: int) -> dict[str, StreamCost]:
    """Each message kind's measured cost at R1, or at R3 for any replicated stream."""
    path = results_dir / "streams.json"
    rows = json.loads(path.read_text())["rows"]
    r = 1 if replicas == 1 else 3
    out = {}
    for row in rows:
        if row["replicas"] != r:
            continue
        each = row.get("server_cpu_cores_each") or [row["server_cpu_cores"]]
        share = max(each) / sum(each) if sum(each) > 0 else 1.0
        label = f"{path} R{r}" + (f" (for R{replicas})" if r != replicas else "")
        out[row["message"]] = StreamCost(float(row["server_cpu_us_per_msg"]), share, label)
    return out


def message_kind(stage: str, hop: str) -> str:
    """The bench-streams row for a stage's messages."""
    return "download-task" if stage == "download" else f"infer-{hop}"


def advise(flow: StageFlow, cost: StreamCost, budget_cores: float) -> PartitionAdvice:
    if budget_cores <= 0:
        raise ValueError("the nats-server budget per node must be positive")
    load = flow.load
    cores = load.msgs_per_s * cost.us_per_msg / 1e6
    busiest = cores * cost.busiest_share
    rate_cap = math.inf if load.replicas < 3 else R3_MSGS_PER_S
    return PartitionAdvice(
        stream=load.stream,
        cores=cores,
        busiest_cores=busiest,
        by_cpu=max(1, math.ceil(busiest / budget_cores - 1e-9)),
        by_rate=max(1, math.ceil(load.msgs_per_s / rate_cap - 1e-9)),
        by_consumers=flow.limits.partitions,
        source=cost.source,
    )


def advise_all(
    flows: list[StageFlow], hop: str, results_dir: Path, budget_cores: float
) -> list[PartitionAdvice]:
    if not flows:
        return []
    costs = stream_costs(results_dir, flows[0].load.replicas)
    return [advise(f, costs[message_kind(f.stage, hop)], budget_cores) for f in flows]


def servers_needed(advice: list[PartitionAdvice], budget_cores: float, replicas: int) -> int:
    """NATS servers whose budgets together carry every stream (at least R)."""
    total = sum(a.cores for a in advice)
    return max(replicas, math.ceil(total / budget_cores - 1e-9))


def render(advice: list[PartitionAdvice], budget_cores: float, replicas: int) -> list[str]:
    lines = [
        f"{'stream':<16} {'server cores':>12} {'busiest':>8} {'by CPU':>7} "
        f"{'by msgs/s':>9} {'by consumers':>12} {'partitions':>10}"
    ]
    for a in advice:
        lines.append(
            f"{a.stream:<16} {a.cores:>12.2f} {a.busiest_cores:>8.2f} {a.by_cpu:>7} "
            f"{a.by_rate:>9} {a.by_consumers:>12} {a.partitions:>10}"
        )
    if advice:
        n = max(a.partitions for a in advice)
        servers = servers_needed(advice, budget_cores, replicas)
        lines += [
            f"  spec.nats.partitions: {n} (the larger stage's), at {budget_cores:g} "
            "nats-server core(s) per node",
            f"  NATS servers for every stream's CPU at that budget: {servers}",
            f"  costs: {advice[0].source}",
        ]
    return lines


__all__ = [
    "DEFAULT_NATS_CORES_PER_NODE",
    "R3_MSGS_PER_S",
    "PartitionAdvice",
    "StreamCost",
    "advise",
    "advise_all",
    "render",
    "servers_needed",
    "stream_costs",
]
