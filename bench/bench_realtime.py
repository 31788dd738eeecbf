"""Real-time deadlines under overload: answer fast or refuse fast.

    python -m bench.bench_realtime --seconds 20 --deadline-ms 1000   (make bench-realtime)

On the local stack (one downloader, one inference worker, real NATS/Redis and
model), one-image URL requests to `POST /v1/tags`:

1. capacity: a closed loop (enough requests in flight to keep both stages busy)
   measures the images/s the stack sustains;
2. then an open loop at 0.5x, 1.3x and 3x that capacity, every request with
   `timeout_ms` = the deadline, records per phase: the share of answers within
   the deadline, the 429 share, p50/p95 of the answered, the served rate against
   capacity, and the work wasted on callers who gave up (items tagged after
   their request had already answered 504) next to the items skipped as
   `deadline_exceeded`;
3. for the capacity run and each phase, the CPU of the stack by process, of the
   bench process itself (load generator and image server: `harness_cores`) and
   of everything else on the box (`other_cores_busy`): on a shared 2-core box
   the load generator's cost and the neighbours' are part of the result.

Results: bench/results/realtime.json, machine stated.

    python -m bench.bench_realtime --default-deadline   (make bench-realtime-default)

The same, but the open-loop requests carry no `timeout_ms`: what a caller gets
out of the box from the gateway's default deadline (2 s), at 2x and 3x capacity.
Each phase also reports the issue-28 goals: >= 95 % of the 200s within the
default, everything else a 429 or a 504, and 504s under 5 % of all requests.
Results: bench/results/realtime-default-deadline.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.baselines.cpu import CpuMeter
from bench.baselines.runners import MODEL_DIR, ROOT
from bench.bench_e2e import machine
from bench.imageserver import ImageServer
from bench.rawhttp import RawClient

OUT = ROOT / "bench" / "results" / "realtime.json"
OUT_DEFAULT = ROOT / "bench" / "results" / "realtime-default-deadline.json"
DEFAULT_DEADLINE_MS = 2000  # the gateway's TAGPIPE_REALTIME_DEFAULT_TIMEOUT_S, out of the box


@dataclass
class Phase:
    offered_per_s: float
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)  # of the 200s
    refusal_latencies_s: list[float] = field(default_factory=list)  # of the 429s
    in_deadline: int = 0
    late_ids: list[str] = field(default_factory=list)  # request ids answered 504
    timeline: list[tuple[float, int, float]] = field(default_factory=list)  # sent, status, s

    def record(self, status: int, latency_s: float, deadline_s: float, request_id: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.latencies_s.append(latency_s)
            self.in_deadline += latency_s <= deadline_s
        elif status == 504:
            self.late_ids.append(request_id)
        elif status == 429:
            self.refusal_latencies_s.append(latency_s)

    def summary(self, capacity: float, wasted: dict[str, int]) -> dict[str, Any]:
        sent = sum(self.statuses.values())
        answered = self.statuses.get(200, 0)
        p = np.percentile(self.latencies_s, [50, 95]) * 1000 if self.latencies_s else [None] * 2
        served = self.in_deadline / self.seconds if self.seconds else 0.0
        return {
            "offered_per_s": round(self.offered_per_s, 1),
            "offered_x_capacity": round(self.offered_per_s / capacity, 2),
            "requests": sent,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "answered_within_deadline_share": round(self.in_deadline / answered, 4)
            if answered
            else None,
            "rejected_429_share": round(self.statuses.get(429, 0) / sent, 4) if sent else None,
            "p50_ms": None if p[0] is None else round(float(p[0]), 1),
            "p95_ms": None if p[1] is None else round(float(p[1]), 1),
            "served_in_deadline_per_s": round(served, 2),
            "served_x_capacity": round(served / capacity, 3),
            **self.outcomes(sent, answered),
            **wasted,
        }

    def outcomes(self, sent: int, answered: int) -> dict[str, Any]:
        """The issue-28 goals for a deadline: 200s within it, the rest refused or 504."""
        late = self.statuses.get(504, 0)
        other = sent - answered - late - self.statuses.get(429, 0)
        refusal = self.refusal_latencies_s
        within = self.in_deadline / answered if answered else None
        return {
            "s504_share_of_all": round(late / sent, 4) if sent else None,
            "other_statuses": other,  # neither 200, 429 nor 504 (0: connection errors)
            "p95_429_ms": round(float(np.percentile(refusal, 95)) * 1000, 1) if refusal else None,
            "goals_met": {
                "200s_within_deadline_ge_95pct": within is not None and within >= 0.95,
                "rest_429_or_504": other == 0,
                "504s_lt_5pct_of_all": bool(sent) and late / sent < 0.05,
            },
        }


def requests(urls: list[str], timeout_ms: int | None) -> list[bytes]:
    """Every request of a run rendered before its clock starts."""
    path = f"/v1/tags?timeout_ms={timeout_ms}" if timeout_ms else "/v1/tags"
    return [RawClient.render(path, {"url": u}) for u in urls]


async def post(c: RawClient, request: bytes) -> tuple[int, str]:
    status, body = await c.send(request)
    # Only a 504 names what to look up afterwards; the others need no parsing.
    return status, str(json.loads(body).get("request_id") or "") if status == 504 else ""


async def capacity(c: RawClient, urls: list[str], secs: float) -> float:
    reqs, done, stop_at = requests(urls, None), 0, time.monotonic() + secs

    async def loop(i: int) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            status, _ = await post(c, reqs[i % len(reqs)])
            done += status == 200
            i += 7

    t0 = time.monotonic()
    await asyncio.gather(*(loop(k) for k in range(24)))
    return done / (time.monotonic() - t0)


async def open_phase(
    c: RawClient, urls: list[str], rate: float, secs: float, deadline_ms: int, ask: bool = True
) -> Phase:
    """`ask`: each request carries `timeout_ms` = the deadline; else none (the default)."""
    phase, tasks, reqs = Phase(rate), [], requests(urls, deadline_ms if ask else None)

    async def one(request: bytes) -> None:
        t0 = time.monotonic()
        try:
            status, rid = await post(c, request)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            status, rid = 0, ""
        phase.record(status, time.monotonic() - t0, deadline_ms / 1000, rid)
        phase.timeline.append((t0 - start, status, time.monotonic() - t0))

    t0 = start = time.monotonic()
    n = int(rate * secs)
    for i in range(n):
        tasks.append(asyncio.create_task(one(reqs[i % len(reqs)])))
        delay = t0 + (i + 1) / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    phase.seconds = time.monotonic() - t0
    await asyncio.gather(*tasks)
    return phase


async def wasted_work(s: aiohttp.ClientSession, base: str, late_ids: list[str]) -> dict[str, int]:
    """Of the requests answered 504, how many items were tagged anyway (work for
    nobody) and how many were skipped as deadline_exceeded."""
    counts = {"wasted_items_tagged_after_deadline": 0, "items_skipped_deadline_exceeded": 0}
    for rid in late_ids:
        async with s.get(f"{base}/v1/results/{rid}") as r:
            if r.status != 200:
                continue
            for item in (await r.json())["items"]:
                if item["status"] == "ok":
                    counts["wasted_items_tagged_after_deadline"] += 1
                elif item.get("code") == "deadline_exceeded":
                    counts["items_skipped_deadline_exceeded"] += 1
    return counts


def profile(args: argparse.Namespace, stack: Any, factor: float) -> subprocess.Popen[bytes] | None:
    """py-spy on the gateway for this phase (--profile DIR), as collapsed stacks."""
    if args.profile is None:
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    pid = stack.service("gateway").proc.pid
    out = args.profile / f"gateway-{factor}x.txt"
    spy = str(Path(sys.executable).parent / "py-spy")
    cmd = [spy, "record", "-p", str(pid), "-d", str(int(args.seconds)), "-r", "50"]
    return subprocess.Popen([*cmd, "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tagpipe_cli.stack import Stack, StackConfig

    async with ImageServer(latency_ms=args.latency_ms) as images:
        urls = [images.url(f"/corpus/640x480/{i % 64}.jpg?i={i}") for i in range(4096)]
        cfg = StackConfig(
            data_dir=ROOT / ".tagpipe" / "bench-realtime",
            downloaders=1,
            inference=1,
            model_dir=MODEL_DIR,
            allow_cidrs="127.0.0.0/8",
            fresh=True,
        )
        stack = await asyncio.to_thread(Stack(cfg).start)
        try:
            base = stack.gateway_url
            conn = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=120)
            c = RawClient("127.0.0.1", stack.port)
            async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
                await capacity(c, urls, 5)  # warm-up
                # The stack (our children) against the bench process itself (load
                # generator and image server: the harness) and the rest of the box.
                meter = CpuMeter()
                meter.start()
                cap = await capacity(c, urls, args.capacity_seconds)
                cap_cores = meter.stop(round(cap * args.capacity_seconds))
                print(f"capacity {cap:.1f} img/s {cap_cores}", flush=True)
                phases = []
                for factor in args.factors:
                    await asyncio.sleep(args.settle_s)  # the queue drains between phases
                    meter.start()
                    spy = profile(args, stack, factor)
                    ph = await open_phase(
                        c, urls, factor * cap, args.seconds, args.deadline_ms, not args.default
                    )
                    cores = meter.stop(ph.statuses.get(200, 0))
                    if spy is not None:
                        spy.wait()
                    await asyncio.sleep(args.settle_s)
                    row = ph.summary(cap, await wasted_work(s, base, ph.late_ids))
                    row["cpu"] = cores
                    if args.profile is not None:
                        tl = args.profile / f"timeline-{factor}x.json"
                        tl.write_text(json.dumps(ph.timeline))
                    print(json.dumps(row), flush=True)
                    phases.append(row)
            await c.close()
        finally:
            await asyncio.to_thread(stack.stop)
    return {
        "machine": machine(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "deadline_ms": args.deadline_ms,
        "timeout_ms_sent": not args.default,  # False: the gateway's default deadline
        "image_latency_ms": args.latency_ms,
        "capacity_images_per_s": round(cap, 2),
        "capacity_cpu": cap_cores,
        "phases": phases,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="open-loop seconds per phase")
    ap.add_argument("--capacity-seconds", type=float, default=20.0)
    ap.add_argument("--deadline-ms", type=int, help="1000; the gateway default with --default")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="image server latency")
    ap.add_argument("--factors", type=float, nargs="+", help="0.5 1.3 3; 2 3 with --default")
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", type=Path, help="py-spy the gateway per phase into DIR")
    ap.add_argument(
        "--default-deadline",
        dest="default",
        action="store_true",
        help="send no timeout_ms: measure the gateway's default deadline",
    )
    ap.add_argument("--note", default="", help="a line on the run's conditions, kept in the JSON")
    args = ap.parse_args()
    if args.deadline_ms is None:
        args.deadline_ms = DEFAULT_DEADLINE_MS if args.default else 1000
    if args.factors is None:
        args.factors = [2.0, 3.0] if args.default else [0.5, 1.3, 3.0]
    if args.out is None:
        args.out = OUT_DEFAULT if args.default else OUT
    load_before = os.getloadavg()
    doc = asyncio.run(run(args))
    # The box may be shared: its load before and after says how busy it was.
    doc["loadavg_1_5_15_before_after"] = [load_before, os.getloadavg()]
    if args.note:
        doc["note"] = args.note
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
