"""The data plane with many downloader replicas on one box: in-flight downloads
and throughput against Little's law, with the old fixed limits and with limits
that follow the deployment.

    python -m bench.bench_scale            (what `make bench-scale` runs, ~8 min)
    python -m bench.bench_scale --quick    (a smoke run, ~1 min)

Each row starts the real stack (cli's Stack: NATS, Redis, the gateway, N
tagpipe-downloader processes, one inference process) against a local image
server that answers every request after `latency` seconds with a tiny JPEG
(64x48, ~2 KB), submits one bulk job through the gateway, and in steady state
samples the bulk download consumer's num_ack_pending (items in flight) and the
download stream's acks (throughput). The bound is Little's law: replicas x
slots / latency.

Inference capacity: a tiny ONNX model built here (global average pool and one
8-class matrix multiply on 32x32 crops, same manifest format as the real
model), so one inference process keeps up and the download tier is measured.
Its crops are 3 KB on the hop, which keeps NATS cheap too.

Modes: `before` is the old fixed limits (StreamPolicy() defaults: max_ack_pending
1000, max_waiting 512; the gateway pausing bulk at 2,000 items, a target wait
so small that the floor always holds); `after` is the current defaults (consumer
limits from flowlimits.consumer_limits, bulk paced by drain rate).

Every downloader gets `slots` connections to the one image host (TAGPIPE_POOL_LIMIT,
TAGPIPE_POOL_LIMIT_PER_HOST=0): the default 32 per host would otherwise cap
each replica at 32 fetches from a single server, whatever its slots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
from tagpipe_cli.stack import Stack, StackConfig
from tagpipe_common.flowlimits import consumer_limits
from tagpipe_common.streams import StreamPolicy, stage_counters
from tagpipe_common.subjects import Lane, Stage, stage_names

from bench.baselines.runners import process
from bench.bench_e2e import machine
from bench.bench_streams import load_average, shared_note
from bench.scale_support import Meter, plot, tiny_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "scale.json"
BEFORE_GATEWAY_ENV = {"TAGPIPE_BULK_BACKLOG_LIMIT": "2000", "TAGPIPE_BULK_TARGET_WAIT_S": "0.001"}
# (mode, replicas, slots, latency_s)
FULL_ROWS = [
    ("after", 2, 32, 4.0),
    ("after", 4, 128, 4.0),
    ("after", 8, 128, 4.0),
    ("after", 8, 512, 4.0),
    ("before", 4, 128, 4.0),
    ("before", 8, 128, 4.0),
    ("before", 8, 512, 4.0),
    # Past 1,000 in flight at a rate this box still carries: the old cap alone.
    ("after", 16, 128, 8.0),
    ("before", 16, 128, 8.0),
]
QUICK_ROWS = [("after", 2, 32, 2.0), ("before", 2, 32, 2.0)]
MAX_RATE = 600.0  # the job needs no more URLs than this box could ever drain


def stack_config(mode: str, replicas: int, slots: int, model_dir: Path) -> StackConfig:
    if mode == "after":
        policy = StreamPolicy(limits={Stage.DOWNLOAD: consumer_limits(replicas, slots)})
        gateway_env: dict[str, str] = {}
    else:
        policy, gateway_env = StreamPolicy(), dict(BEFORE_GATEWAY_ENV)
    return StackConfig(
        data_dir=ROOT / ".tagpipe" / "bench-scale",
        downloaders=replicas,
        inference=1,
        model_dir=model_dir,
        policy=policy,
        allow_cidrs="127.0.0.0/8",
        fresh=True,
        gateway_env=gateway_env,
        downloader_env={
            "TAGPIPE_MAX_INFLIGHT": str(slots),
            "TAGPIPE_POOL_LIMIT": str(slots),
            "TAGPIPE_POOL_LIMIT_PER_HOST": "0",
            "TAGPIPE_DRAIN_TIMEOUT_S": "2",
        },
    )


async def submit(base: str, img: str, n: int) -> str:
    urls = [f"{img}/corpus/64x48/{i % 16}.jpg?n={i}" for i in range(n)]
    async with aiohttp.ClientSession() as s, s.post(f"{base}/v1/jobs", json=urls) as r:
        body = await r.json()
        if r.status != 202:
            raise RuntimeError(f"job submission: {r.status} {body}")
        return str(body["job_id"])


async def sample(stack: Stack, seconds: float, every_s: float = 0.5) -> dict[str, Any]:
    """num_ack_pending of the bulk download consumer, and the download and
    inference streams' acks over `seconds` of steady state."""
    names = stage_names(Stage.DOWNLOAD, stack.config.prefix)
    nc = await nats.connect(stack.nats_url, connect_timeout=5)
    try:
        js = nc.jetstream()
        prefix = stack.config.prefix
        d0, i0 = await asyncio.gather(
            stage_counters(js, Stage.DOWNLOAD, prefix), stage_counters(js, Stage.INFER, prefix)
        )
        t0 = time.perf_counter()
        inflight, waiting, infer_backlog = [], [], []
        while time.perf_counter() - t0 < seconds:
            await asyncio.sleep(every_s)
            info = await js.consumer_info(names.stream, names.consumer(Lane.BULK))
            inflight.append(int(info.num_ack_pending or 0))
            waiting.append(int(info.num_pending or 0))
            ic = await stage_counters(js, Stage.INFER, prefix)
            infer_backlog.append(ic.pending + ic.ack_pending)
        d1, i1 = await asyncio.gather(
            stage_counters(js, Stage.DOWNLOAD, prefix), stage_counters(js, Stage.INFER, prefix)
        )
        wall = time.perf_counter() - t0
    finally:
        await nc.close()
    return {
        "seconds": round(wall, 2),
        "inflight_mean": round(sum(inflight) / len(inflight), 1),
        "inflight_min": min(inflight),
        "download_queue_mean": round(sum(waiting) / len(waiting), 1),
        "infer_backlog_mean": round(sum(infer_backlog) / len(infer_backlog), 1),
        "throughput": round((d1.removed - d0.removed) / wall, 1),
        "inference_throughput": round((i1.removed - i0.removed) / wall, 1),
    }


async def one_row(
    mode: str, replicas: int, slots: int, latency: float, img: str, args: argparse.Namespace
) -> dict[str, Any]:
    bound = replicas * slots / latency
    warm = 2 * latency + args.warm
    n = math.ceil(min(bound, MAX_RATE) * (warm + args.measure + 2 * latency + 10))
    cfg = stack_config(mode, replicas, slots, args.model_dir)
    t_start = time.perf_counter()
    stack = await asyncio.to_thread(Stack(cfg).start)
    try:
        started_s = time.perf_counter() - t_start
        await submit(stack.gateway_url, img, n)
        await asyncio.sleep(warm)
        meter = Meter(stack, args.server_pid)
        s = await sample(stack, args.measure)
        cpu = meter.stop()
        if dead := stack.dead():
            raise RuntimeError(f"{dead[0].name} died: {dead[0].log_tail(600)}")
    finally:
        await asyncio.to_thread(stack.stop, 5.0)
    limits = cfg.policy.consumer_config(Stage.DOWNLOAD, Lane.BULK) if cfg.policy else None
    if s["throughput"]:
        cpu["ms_per_download"] = {
            g: round(c / s["throughput"] * 1000, 2) for g, c in cpu["cores"].items()
        }
    row = {
        "mode": mode,
        "replicas": replicas,
        "slots": slots,
        "latency_s": latency,
        "slots_total": replicas * slots,
        "inflight": s["inflight_mean"],
        "inflight_share": round(s["inflight_mean"] / (replicas * slots), 3),
        "throughput": s["throughput"],
        "bound": round(bound, 1),
        "bound_share": round(s["throughput"] / bound, 3),
        "max_ack_pending": limits.max_ack_pending if limits else None,
        "max_waiting": limits.max_waiting if limits else None,
        "job_items": n,
        "stack_start_s": round(started_s, 1),
        "sample": s,
        "cpu": cpu,
    }
    row["bound_by"] = bound_by(row)
    return row


def bound_by(row: dict[str, Any]) -> str | None:
    """What held a row that missed the goal: the consumer's cap on acks pending,
    or the box's CPU (busy throughout), naming the group that used the most."""
    capped = row["inflight"] >= 0.95 * row["max_ack_pending"]
    if row["inflight_share"] < 0.9 and capped:
        return f"max_ack_pending {row['max_ack_pending']}"
    if row["bound_share"] < 0.85 and (row["cpu"]["box_busy"] or 0) >= 0.95:
        return f"cpu: box {row['cpu']['box_busy']:.0%} busy, most in {row['cpu']['biggest']}"
    if row["inflight_share"] < 0.9 or row["bound_share"] < 0.85:
        return "unexplained: see sample and cpu"
    return None


def verdict(row: dict[str, Any]) -> str:
    ok = row["inflight_share"] >= 0.9 and row["bound_share"] >= 0.85
    return "met" if ok else "MISSED"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rows_spec = QUICK_ROWS if args.quick else FULL_ROWS
    load_before = load_average()
    rows: list[dict[str, Any]] = []
    latencies = sorted({r[3] for r in rows_spec})
    for latency in latencies:
        cmd = [sys.executable, "-m", "bench.imageserver", "--port", "0"]
        cmd += ["--latency-ms", str(latency * 1000)]
        with process(cmd, stdout=subprocess.PIPE) as srv:
            assert srv.stdout is not None
            line = await asyncio.to_thread(srv.stdout.readline)
            img = line.split()[2].rstrip("/")
            args.server_pid = srv.pid
            for mode, replicas, slots, lat in rows_spec:
                if lat != latency:
                    continue
                row = await one_row(mode, replicas, slots, lat, img, args)
                rows.append(row)
                print(
                    f"{mode:<6} {replicas:>2} x {slots:<4} @ {lat:g} s: in flight "
                    f"{row['inflight']:>7} ({row['inflight_share']:.0%}), {row['throughput']}"
                    f"/s of {row['bound']} ({row['bound_share']:.0%}) {verdict(row)}; "
                    f"box {row['cpu']['box_busy']:.0%} busy; {row['bound_by'] or ''}",
                    flush=True,
                )
    load_after = load_average()
    return {
        "benchmark": "scale",
        "machine": {**machine(), "load_average_before": load_before},
        "load_average_after": load_after,
        "box": shared_note(load_before, load_after),
        "setup": {
            "image": "64x48 JPEG (~2 KB), bench/imageserver.py, one process",
            "model": "tiny ONNX (32x32 crops, 8 classes), one inference process",
            "measure_s": args.measure,
            "warm_s": f"2 x latency + {args.warm:g}",
            "before": {"stream_policy": "StreamPolicy() defaults", "gateway": BEFORE_GATEWAY_ENV},
            "after": {"stream_policy": "flowlimits.consumer_limits(replicas, slots)"},
            "goal": "inflight_share >= 0.9 and bound_share >= 0.85, up to where CPU binds",
        },
        "rows": rows,
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="two small rows, ~1 min")
    ap.add_argument("--measure", type=float, default=12.0, help="steady-state seconds per row")
    ap.add_argument("--warm", type=float, default=4.0, help="warm-up beyond 2 x latency")
    ap.add_argument(
        "--out", type=Path, help="default: bench/results/scale.json (--quick: a temp dir)"
    )
    args = ap.parse_args()
    # A smoke run never overwrites the committed figures.
    quick_out = Path(tempfile.gettempdir()) / "tagpipe-bench-scale-quick.json"
    args.out = args.out or (quick_out if args.quick else OUT)
    if args.quick:
        args.measure, args.warm = 6.0, 2.0
    with tempfile.TemporaryDirectory(prefix="bench-scale-model-") as tmp:
        args.model_dir = tiny_model(Path(tmp))
        doc = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
