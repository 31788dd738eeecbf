"""Soak: minutes of mixed real-time and bulk load on the whole local stack.

Reports errors and each process's memory over time (VmRSS from /proc), so a leak
shows as a trend, not as a crash a day later:

    python -m bench.soak --minutes 30 --out bench/results/soak-30min.json

Request and job sizes are drawn at random (seeded), so inference meets every batch
size from 1 to max_batch. Results, jobs and cached tags expire after --ttl-s, so
Redis holds a bounded window rather than days of them (which would read as a leak).
The verdict per process is its growth over the last --window-min minutes, goal
<= 5 %: the least-squares line through every sample of the window, its value at
the window's end against its value at the start. Two one-minute medians (the
earlier verdict, still reported) land wherever a garbage collector's sawtooth is:
nats-server swings +-20 % within a minute with no trend, which read as 10-15 %
"growth" or shrinkage by chance. The line uses all ~120 samples and moves only
with a trend. Run it on a box with steady neighbours: Redis holds the results of
the last --ttl-s, so its dataset follows the soak's throughput, and tests that
stop halfway through read as growth (soak-30min.json: `redis_dataset_trend`).
`--memray DIR` runs each inference process under `memray run --native`.

The stack is tagpipe_cli.stack (NATS, Redis, gateway, 2 downloaders, 2 inference
workers, the real model); images come from bench.imageserver on 127.0.0.1.
Real-time 429s are backpressure, counted apart from errors; an error is any other
non-200 answer, a transport failure, or a bulk job whose items do not all end ok.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import stat
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tagpipe_cli.stack as stack_mod
from redis.asyncio import Redis
from tagpipe_cli.stack import Stack, StackConfig

from bench.imageserver import ImageServer

MODEL_DIR = Path("models/efficientnet-lite0")
SIZES = ("320x240", "640x480", "1024x768")
GOAL_PCT = 5.0


@dataclass
class Tally:
    realtime: Counter[str] = field(default_factory=Counter)
    realtime_items: int = 0
    bulk_jobs: int = 0
    bulk_items: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    rss: list[dict[str, Any]] = field(default_factory=list)
    # Redis's own view (INFO), to tell its dataset from its allocator's high-water mark.
    redis: list[dict[str, Any]] = field(default_factory=list)
    allocator: str = ""


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_rss(stack: Stack) -> dict[str, int]:
    out = {s.name: rss_kb(s.proc.pid) for s in stack.services if s.alive and s.proc}
    for srv in (stack.nats, stack.redis):
        if srv is not None and srv.proc is not None and srv.proc.poll() is None:
            out[srv.name] = rss_kb(srv.proc.pid)
    return out


async def realtime_loop(
    http: httpx.AsyncClient, images: ImageServer, t: Tally, w: int, end: float
) -> None:
    k, rng = 0, random.Random(w)
    while time.monotonic() < end:
        size = rng.choice(SIZES)
        urls = [
            images.url(f"/corpus/{size}/{(w * 7 + k + i) % 16}.jpg?rt={w}-{k}-{i}")
            for i in range(rng.randint(1, 16))
        ]
        k += 1
        try:
            r = await http.post("/v1/tags", json={"urls": urls})
        except httpx.HTTPError as exc:
            t.errors[f"realtime {type(exc).__name__}"] += 1
            continue
        t.realtime[str(r.status_code)] += 1
        if r.status_code == 200:
            t.realtime_items += sum(i["status"] == "ok" for i in r.json()["items"])
            await asyncio.sleep(rng.uniform(0, 0.3))  # bursts and lulls: batch sizes vary
        elif r.status_code == 429:
            await asyncio.sleep(0.5)
        else:
            t.errors[f"realtime {r.status_code} {r.json().get('code')}"] += 1


async def bulk_loop(
    http: httpx.AsyncClient, images: ImageServer, t: Tally, size: int, end: float
) -> None:
    j, rng = 0, random.Random(size)
    while time.monotonic() < end:
        n = rng.randint(size // 6, size)
        urls = [images.url(f"/corpus/{SIZES[i % 2]}/{i % 16}.jpg?job={j}&i={i}") for i in range(n)]
        j += 1
        try:
            job_id = (await http.post("/v1/jobs", json=urls)).raise_for_status().json()["job_id"]
            while True:
                s = (await http.get(f"/v1/jobs/{job_id}")).json()
                if s["state"] == "completed" and s["finished"] == s["total"]:
                    break
                await asyncio.sleep(0.5)
        except (httpx.HTTPError, KeyError) as exc:
            t.errors[f"bulk {type(exc).__name__}"] += 1
            continue
        t.bulk_jobs += 1
        t.bulk_items += s["done"]
        if s["done"] != n:
            t.errors["bulk items not ok"] += n - s["done"]


async def redis_view(client: Redis) -> dict[str, int]:
    """Redis's dataset as it counts it: used_memory (what it allocated) and keys."""
    info = await client.info("memory")
    return {"used_memory": int(info["used_memory"]) // 1024, "keys": int(await client.dbsize())}


async def sampler(stack: Stack, t: Tally, start: float, end: float, every_s: float) -> None:
    client = Redis.from_url(stack.redis_url)
    try:
        t.allocator = str((await client.info("memory")).get("mem_allocator", "?"))
        while time.monotonic() < end:
            at = round(time.monotonic() - start, 1)
            t.rss.append({"t_s": at, "rss_kb": process_rss(stack)})
            t.redis.append({"t_s": at, "rss_kb": await redis_view(client)})
            await asyncio.sleep(every_s)
    finally:
        await client.aclose()


def _median_kb(ts: np.ndarray, kb: np.ndarray, lo: float, hi: float) -> float:
    sel = kb[(ts >= lo) & (ts <= hi)]
    return float(np.median(sel)) if sel.size else float("nan")


def fitted_growth_pct(ts: np.ndarray, kb: np.ndarray, t0: float) -> float:
    """Growth from t0 to the last sample along the least-squares line of the samples
    since t0 (the verdict: a sawtooth without a trend reads as ~0)."""
    w = ts >= t0
    if w.sum() < 3:
        return float("nan")
    line = np.polyfit(ts[w], kb[w], 1)
    start, end = np.polyval(line, t0), np.polyval(line, ts[-1])
    return round(float((end - start) / start * 100), 2)


def trend(samples: list[dict[str, Any]], window_s: float) -> dict[str, dict[str, Any]]:
    """Per process: first, last, peak, the fitted slope over the second half (KiB/min),
    and the growth over the last `window_s`: along the fitted line (the verdict) and
    as the median of its first minute against that of its last."""
    out = {}
    for name in samples[0]["rss_kb"]:
        ts = np.array([s["t_s"] for s in samples if name in s["rss_kb"]], float)
        kb = np.array([s["rss_kb"][name] for s in samples if name in s["rss_kb"]], float)
        half = len(ts) // 2
        slope = float(np.polyfit(ts[half:], kb[half:], 1)[0] * 60) if len(ts) - half >= 3 else 0.0
        t0 = ts[-1] - window_s
        start, end = _median_kb(ts, kb, t0, t0 + 60), _median_kb(ts, kb, ts[-1] - 60, ts[-1])
        growth = fitted_growth_pct(ts, kb, t0)
        out[name] = {
            "first_kb": int(kb[0]),
            "last_kb": int(kb[-1]),
            "peak_kb": int(kb.max()),
            "second_half_slope_kb_per_min": round(slope, 1),
            "window_start_kb": int(start),
            "window_end_kb": int(end),
            "window_peak_kb": int(kb[ts >= t0].max()),
            "window_growth_pct": growth,
            "window_growth_pct_of_medians": round((end - start) / start * 100, 2),
            "within_goal": bool(growth <= GOAL_PCT),
        }
    return out


def plot(samples: list[dict[str, Any]], window_s: float, title: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (big, small) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    for name in samples[0]["rss_kb"]:
        pts = [(s["t_s"] / 60, s["rss_kb"][name] / 1024) for s in samples if name in s["rss_kb"]]
        ax = big if name.startswith("inference") else small
        ax.plot(*zip(*pts, strict=True), label=name, linewidth=1)
    for ax in (big, small):
        ax.axvspan((samples[-1]["t_s"] - window_s) / 60, samples[-1]["t_s"] / 60, alpha=0.08)
        ax.set_ylabel("RSS (MiB)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    small.set_xlabel("minutes (shaded: the window the growth goal is judged on)")
    big.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def memray_binary(out_dir: Path) -> str:
    """A `tagpipe-inference` that runs under memray (native stacks), one file per pid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    real = stack_mod.find_binary("tagpipe-inference")
    wrapper = out_dir / "tagpipe-inference"
    wrapper.write_text(
        f"#!/bin/sh\nexec {sys.executable} -m memray run --native --trace-python-allocators "
        f'-q -o {out_dir.resolve()}/inference-$$.bin {real} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


async def drive(stack: Stack, args: argparse.Namespace) -> Tally:
    t = Tally()
    async with (
        ImageServer(host="127.0.0.1") as images,
        httpx.AsyncClient(base_url=stack.gateway_url, timeout=90) as http,
    ):
        # Warm-up (model sessions, corpus cache) before the clock and the first sample.
        await http.post(
            "/v1/tags", json={"urls": [images.url(f"/corpus/320x240/{i}.jpg") for i in range(16)]}
        )
        start = time.monotonic()
        end = start + args.duration_s
        await asyncio.gather(
            sampler(stack, t, start, end, args.sample_s),
            bulk_loop(http, images, t, args.job_size, end),
            *(realtime_loop(http, images, t, w, end) for w in range(args.realtime_clients)),
        )
        t.rss.append({"t_s": round(time.monotonic() - start, 1), "rss_kb": process_rss(stack)})
    return t


def stack_config(args: argparse.Namespace, data_dir: Path) -> StackConfig:
    ttl = str(args.ttl_s)
    return StackConfig(
        data_dir=data_dir,
        model_dir=args.model_dir,
        downloaders=2,
        inference=2,
        allow_cidrs="127.0.0.0/8",
        env={
            "TAGPIPE_RESULT_TTL_S": ttl,
            "TAGPIPE_CONTENT_DEDUPE_TTL_S": ttl,
            "TAGPIPE_JOB_TTL_S": ttl,  # a job's results stream: 7 days by default
        },
        inference_env={"TAGPIPE_INTRA_OP_THREADS": "1", **dict(args.inference_env)},
        gateway_env={
            "TAGPIPE_REALTIME_TIMEOUT_S": "60",
            "TAGPIPE_REALTIME_DEFAULT_TIMEOUT_S": "60",
        },
        downloader_env={"TAGPIPE_DECODE_WORKERS": "1"},
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--window-min", type=float, default=10, help="growth judged over the last N")
    ap.add_argument("--realtime-clients", type=int, default=2)
    ap.add_argument("--job-size", type=int, default=300, help="largest bulk job (sizes vary)")
    ap.add_argument("--sample-s", type=float, default=2, help="RSS sampling period")
    ap.add_argument("--ttl-s", type=int, default=300, help="result, job and tag-cache TTL")
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--memray", type=Path, help="run inference under memray, files here")
    ap.add_argument(
        "--inference-env", nargs="*", default=[], type=lambda kv: tuple(kv.split("=", 1))
    )
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = ap.parse_args()
    args.duration_s = args.minutes * 60
    args.window_s = min(args.window_min * 60, args.duration_s / 2)
    return args


def main() -> None:
    args = parse_args()
    if args.memray:
        wrapper, real = memray_binary(args.memray), stack_mod.find_binary

        def find(name: str) -> str:
            return wrapper if name == "tagpipe-inference" else real(name)

        stack_mod.find_binary = find  # the Stack names its binaries; profile just one
    with (
        tempfile.TemporaryDirectory(prefix="tagpipe-soak-") as tmp,
        Stack(stack_config(args, Path(tmp))) as stack,  # main thread: PDEATHSIG is per thread
    ):
        t = asyncio.run(drive(stack, args))
        dead = [s.name for s in stack.dead()]
    rss = trend(t.rss, args.window_s)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "nice": os.nice(0),
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "note": args.note,
        "config": {k: str(v) for k, v in vars(args).items() if k != "note"},
        "errors_total": sum(t.errors.values()),
        "errors": dict(t.errors),
        "services_died": dead,
        "realtime_status": dict(t.realtime),
        "realtime_items_ok": t.realtime_items,
        "bulk_jobs_completed": t.bulk_jobs,
        "bulk_items_ok": t.bulk_items,
        "goal": f"every process grows <= {GOAL_PCT} % over the last {args.window_s / 60:g} min",
        "all_within_goal": all(r["within_goal"] for r in rss.values()),
        "rss_trend": rss,
        # Not part of the goal: Redis's dataset (KiB, keys) over the same window, so a
        # step in its RSS can be told apart from growth of what it holds.
        "redis_allocator": t.allocator,
        "redis_dataset_trend": trend(t.redis, args.window_s) if t.redis else {},
        "rss_samples": t.rss,
        "redis_samples": t.redis,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    title = f"soak {args.minutes:g} min: RSS per process ({args.out.name})"
    plot(t.rss, args.window_s, title, args.out.with_suffix(".png"))
    shown = {k: v for k, v in report.items() if k not in ("rss_samples", "redis_samples")}
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
