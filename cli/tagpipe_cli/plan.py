"""`tagpipe plan`: measured per-replica throughput -> replicas and nodes per stage.

The arithmetic is a pure function (`plan_capacity`) so it can be tested on known
inputs; the CLI only gathers rates (bench JSONs, flags, or stated defaults) and
prints. Every figure that is an assumption rather than a measurement on this
machine is labelled as such in the output.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tagpipe_common.subjects import Stage

from tagpipe_cli import partitionplan, streamplan
from tagpipe_cli import rates as rates_mod
from tagpipe_cli.rates import Rate, StageRates

# A T4 node shaped like AWS g4dn.4xlarge: 1 GPU, 16 vCPU.
DEFAULT_GPU_NODE_CORES = 16
DEFAULT_CPU_NODE_CORES = 16
# kubelet, kube-proxy, CNI, log shipper: cores no pod can have.
DEFAULT_SYSTEM_RESERVED_CORES = 1.0


@dataclass(frozen=True)
class PlanInputs:
    rate: float  # target images/s
    mix: dict[str, float]  # image class -> share of traffic, sums to 1
    rates: StageRates
    target_util: float = 0.7  # provision so the target rate uses this share of capacity
    downloader_cores: float = 1.0
    cpu_inference_cores: float = 2.0
    gpu_inference_cores: float = 2.0  # host cores feeding one GPU replica
    gpus_per_node: int = 1
    gpu_node_cores: int = DEFAULT_GPU_NODE_CORES
    cpu_node_cores: int = DEFAULT_CPU_NODE_CORES
    reserved_cores: float = DEFAULT_SYSTEM_RESERVED_CORES


@dataclass(frozen=True)
class StagePlan:
    stage: str
    per_replica: float  # img/s one replica sustains
    replicas: int
    cores_per_replica: float
    gpus_per_replica: int = 0
    basis: str = "measured"  # measured, scaled (from another GPU) or assumed

    @property
    def capacity(self) -> float:
        return self.replicas * self.per_replica

    @property
    def cores(self) -> float:
        return self.replicas * self.cores_per_replica


@dataclass(frozen=True)
class Scenario:
    name: str
    stages: list[StagePlan]
    gpu_nodes: int
    cpu_nodes: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    rate: float
    provisioned_rate: float
    mix: dict[str, float]
    scenarios: list[Scenario]
    sources: dict[str, str]


def mixed_rate(per_class: dict[str, float], mix: dict[str, float]) -> float:
    """Throughput of one replica on a mix: time-weighted (harmonic), not averaged.

    A replica spends 1/r_c seconds per image of class c, so a mix costs
    sum(share_c / r_c) seconds per image.
    """
    missing = set(mix) - set(per_class)
    if missing:
        raise ValueError(f"no rate for image class(es) {sorted(missing)}; have {sorted(per_class)}")
    seconds = sum(share / per_class[c] for c, share in mix.items() if share > 0)
    if seconds <= 0:
        raise ValueError("mix has no traffic")
    return 1.0 / seconds


def replicas_for(rate: float, per_replica: float) -> int:
    if per_replica <= 0:
        raise ValueError("per-replica throughput must be positive")
    # Tiny epsilon: 100.0/50.0 must be 2 replicas, not 3 after float noise.
    return max(1, math.ceil(rate / per_replica - 1e-9))


def pods_per_node(node_cores: float, reserved: float, pod_cores: float) -> int:
    fit = int((node_cores - reserved) // pod_cores)
    if fit < 1:
        raise ValueError(f"a {pod_cores}-core pod does not fit a {node_cores}-core node")
    return fit


def _cpu_scenario(inp: PlanInputs, target: float, download: StagePlan) -> Scenario:
    cpu = inp.rates.cpu_inference
    infer = StagePlan(
        "inference (CPU)", cpu.value, replicas_for(target, cpu.value), inp.cpu_inference_cores
    )
    infer = replace(infer, basis=basis(cpu.source))
    # Pack each stage on its own nodes: simple, and what a nodeSelector per
    # tier gives; mixing tiers on one node saves at most one node per stage.
    nodes = 0
    for st in (download, infer):
        per_node = pods_per_node(inp.cpu_node_cores, inp.reserved_cores, st.cores_per_replica)
        nodes += math.ceil(st.replicas / per_node)
    return Scenario("CPU nodes", [download, infer], gpu_nodes=0, cpu_nodes=nodes)


def _gpu_scenario(inp: PlanInputs, target: float, download: StagePlan) -> Scenario:
    gpu_rate = inp.rates.gpu_inference.value
    infer = StagePlan(
        "inference (T4 GPU)",
        gpu_rate,
        replicas_for(target, gpu_rate),
        inp.gpu_inference_cores,
        1,
        basis(inp.rates.gpu_inference.source),
    )
    gpu_nodes = math.ceil(infer.replicas / inp.gpus_per_node)
    # The GPU nodes' spare cores host downloader pods first: they are paid for.
    spare = inp.gpu_node_cores - inp.reserved_cores - inp.gpu_inference_cores * inp.gpus_per_node
    dl_on_gpu_nodes = min(
        download.replicas, gpu_nodes * max(0, int(spare // download.cores_per_replica))
    )
    rest = download.replicas - dl_on_gpu_nodes
    per_cpu_node = pods_per_node(inp.cpu_node_cores, inp.reserved_cores, download.cores_per_replica)
    cpu_nodes = math.ceil(rest / per_cpu_node)
    notes = [
        f"{dl_on_gpu_nodes} downloader pods on the GPU nodes' spare cores, {rest} on CPU nodes",
        "decode is the binding stage: GPU nodes are mostly idle host CPUs around a busy-enough GPU"
        if download.cores > infer.cores * 4
        else "inference and download tiers are of similar size",
    ]
    dec = inp.rates.gpu_decode
    if dec is not None:
        notes.append(
            f"decode: gpu measured at {dec.value:,.0f} img/s per T4 (decode + inference), "
            f"{math.ceil(target / dec.value)} T4s for the target; the downloaders then forward "
            "JPEGs instead of decoding them"
        )
    return Scenario("T4 GPU nodes", [download, infer], gpu_nodes, cpu_nodes, notes)


def plan_capacity(inp: PlanInputs) -> Plan:
    if not 0 < inp.target_util <= 1:
        raise ValueError("target utilisation must be in (0, 1]")
    total = sum(inp.mix.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"mix shares sum to {total:g}, not 1")
    target = inp.rate / inp.target_util
    dl_per_replica = mixed_rate({c: r.value for c, r in inp.rates.download.items()}, inp.mix)
    dl_basis = [basis(r.source) for c, r in inp.rates.download.items() if inp.mix.get(c, 0) > 0]
    download = StagePlan(
        "downloader",
        dl_per_replica,
        replicas_for(target, dl_per_replica),
        inp.downloader_cores,
        basis="assumed" if "assumed" in dl_basis else "measured",
    )
    return Plan(
        rate=inp.rate,
        provisioned_rate=target,
        mix=dict(inp.mix),
        scenarios=[_gpu_scenario(inp, target, download), _cpu_scenario(inp, target, download)],
        sources=inp.rates.sources(),
    )


def basis(source: str) -> str:
    """measured, scaled or assumed, from a Rate's source (flags count as measured:
    whoever passes one vouches for it)."""
    for word in ("assumed", "scaled"):
        if source.startswith(word):
            return word
    return "measured"


def parse_mix(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, share = part.partition("=")
        if not sep:
            raise ValueError(f"mix item {part!r} is not class=share")
        out[name.strip()] = float(share)
    return out


def render_table(plan: Plan) -> str:
    mix = ", ".join(f"{k} {v:.0%}" for k, v in plan.mix.items())
    lines = [
        f"target {plan.rate:,.0f} img/s ({mix}); "
        f"provisioned for {plan.provisioned_rate:,.0f} img/s",
        "",
    ]
    header = f"{'stage':<20} {'img/s/replica':>13} {'replicas':>9} {'cores':>7} {'GPUs':>5}  rate"
    for sc in plan.scenarios:
        lines += [f"== {sc.name}: {sc.gpu_nodes} GPU nodes + {sc.cpu_nodes} CPU nodes ==", header]
        for st in sc.stages:
            gpus = st.replicas * st.gpus_per_replica
            lines.append(
                f"{st.stage:<20} {st.per_replica:>13,.1f} {st.replicas:>9,} "
                f"{st.cores:>7,.0f} {gpus:>5}  {st.basis}"
            )
        lines += [f"  - {n}" for n in sc.notes] + [""]
    lines.append("rates from:")
    lines += [f"  {k}: {v}" for k, v in plan.sources.items()]
    return "\n".join(lines)


def plan_to_json(plan: Plan) -> dict[str, Any]:
    out = asdict(plan)
    for sc_out, sc in zip(out["scenarios"], plan.scenarios, strict=True):
        for st_out, st in zip(sc_out["stages"], sc.stages, strict=True):
            st_out["capacity"] = st.capacity
            st_out["cores"] = st.cores
    return out


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("plan", help="replicas and nodes per stage for a target rate")
    p.add_argument("--rate", type=float, default=6250.0, help="target images/s (default 6250)")
    p.add_argument("--mix", default="thumb=0.8,phone=0.2", help="class=share,... (sums to 1)")
    p.add_argument("--target-util", type=float, default=0.7, help="headroom: use this share")
    p.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--gpu-node-cores", type=int, default=DEFAULT_GPU_NODE_CORES)
    p.add_argument("--cpu-node-cores", type=int, default=DEFAULT_CPU_NODE_CORES)
    p.add_argument(
        "--hop",
        choices=["raw", "jpeg", "webp-lossless", "original"],
        default="raw",
        help="the inference hop encoding, for the INFER stream's bytes (default raw, the CRD's)",
    )
    p.add_argument("--stream-replicas", type=int, default=3, help="JetStream R (default 3)")
    p.add_argument(
        "--nats-cores-per-node",
        type=float,
        default=partitionplan.DEFAULT_NATS_CORES_PER_NODE,
        help="nats-server CPU budget per node, for the partitions per stage (default 1 core)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    rates_mod.add_rate_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        stage_rates = rates_mod.resolve(args)
        plan = plan_capacity(
            PlanInputs(
                rate=args.rate,
                mix=parse_mix(args.mix),
                rates=stage_rates,
                target_util=args.target_util,
                gpu_node_cores=args.gpu_node_cores,
                cpu_node_cores=args.cpu_node_cores,
            )
        )
        flows = scenario_flows(plan, args.hop, args.stream_replicas, args.results_dir)
        budget = args.nats_cores_per_node
        parts = {
            name: partitionplan.advise_all(fl, args.hop, args.results_dir, budget)
            for name, fl in flows.items()
            if (args.results_dir / "streams.json").is_file()  # else: no measured costs
        }
    except (ValueError, OSError, KeyError) as exc:
        print(f"tagpipe plan: {exc}")
        return 2
    if args.json:
        out = plan_to_json(plan)
        for sc_out, name in zip(out["scenarios"], flows, strict=True):
            sc_out["streams"] = [asdict(f) | _load_rates(f) for f in flows[name]]
            if name in parts:
                sc_out["partitions"] = _partitions_json(parts[name], budget, args.stream_replicas)
        print(json.dumps(out, indent=2))
        return 0
    print(render_table(plan))
    for name, fl in flows.items():
        print(f"\n== flow control and streams at {plan.rate:,.0f} msgs/s peak, {name} ==")
        print("\n".join(streamplan.render_flows(fl)))
        print(f"\n== partitions per stage, {name} ==")
        if name not in parts:
            print(f"  no {args.results_dir / 'streams.json'}: `make bench-streams` measures it")
            continue
        print("\n".join(partitionplan.render(parts[name], budget, args.stream_replicas)))
    print(f"\n  inference hop: {args.hop} ({hop_source(args.hop, args.results_dir)})")
    return 0


def hop_source(hop: str, results_dir: Path) -> str:
    return streamplan.inference_task_bytes(hop, results_dir)[1]


def _partitions_json(
    advice: list[partitionplan.PartitionAdvice], budget: float, replicas: int
) -> dict[str, Any]:
    return {
        "recommended": max((a.partitions for a in advice), default=1),
        "nats_cores_per_node": budget,
        "nats_servers": partitionplan.servers_needed(advice, budget, replicas),
        "streams": [asdict(a) | {"partitions": a.partitions} for a in advice],
    }


def _load_rates(f: streamplan.StageFlow) -> dict[str, float]:
    return {
        "bytes_per_s": f.load.bytes_per_s,
        "replicated_bytes_per_s": f.load.replicated_bytes_per_s,
    }


def scenario_flows(
    plan: Plan, hop: str, stream_replicas: int, results_dir: Path
) -> dict[str, list[streamplan.StageFlow]]:
    """Each scenario's consumer limits (from its replicas) and stream loads (at peak)."""
    sizes = {
        Stage.DOWNLOAD: streamplan.download_task_bytes(),
        Stage.INFER: streamplan.inference_task_bytes(hop, results_dir)[0],
    }
    out = {}
    for sc in plan.scenarios:
        replicas = {Stage.DOWNLOAD: sc.stages[0].replicas, Stage.INFER: sc.stages[1].replicas}
        out[sc.name] = streamplan.stage_flows(plan.rate, replicas, sizes, stream_replicas)
    return out


__all__ = ["Plan", "PlanInputs", "Rate", "add_parser", "plan_capacity", "run"]
