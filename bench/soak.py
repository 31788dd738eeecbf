"""Soak: a few minutes of mixed real-time and bulk load on the whole local stack.

Reports errors and each process's memory over time (VmRSS from /proc), so a leak
shows as a trend, not as a crash a day later:

    python -m bench.soak --duration-s 180 --out bench/results/soak.json

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
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tagpipe_cli.stack import Stack, StackConfig

from bench.imageserver import ImageServer

MODEL_DIR = Path("models/efficientnet-lite0")


@dataclass
class Tally:
    realtime: Counter[str] = field(default_factory=Counter)
    realtime_items: int = 0
    bulk_jobs: int = 0
    bulk_items: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    rss: list[dict[str, Any]] = field(default_factory=list)


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
    k = 0
    while time.monotonic() < end:
        urls = [
            images.url(f"/corpus/320x240/{(w * 7 + k + i) % 16}.jpg?rt={w}-{k}-{i}")
            for i in range(4)
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
        elif r.status_code == 429:
            await asyncio.sleep(0.5)
        else:
            t.errors[f"realtime {r.status_code} {r.json().get('code')}"] += 1


async def bulk_loop(
    http: httpx.AsyncClient, images: ImageServer, t: Tally, size: int, end: float
) -> None:
    j = 0
    while time.monotonic() < end:
        urls = [images.url(f"/corpus/320x240/{i % 16}.jpg?job={j}&i={i}") for i in range(size)]
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
        if s["done"] != size:
            t.errors["bulk items not ok"] += size - s["done"]


async def sampler(stack: Stack, t: Tally, start: float, end: float, every_s: float) -> None:
    while time.monotonic() < end:
        t.rss.append({"t_s": round(time.monotonic() - start, 1), "rss_kb": process_rss(stack)})
        await asyncio.sleep(every_s)


def trend(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per process: first, last, peak and the fitted slope over the second half (KiB/min)."""
    out = {}
    for name in samples[0]["rss_kb"]:
        ts = np.array([s["t_s"] for s in samples if name in s["rss_kb"]], float)
        kb = np.array([s["rss_kb"][name] for s in samples if name in s["rss_kb"]], float)
        half = len(ts) // 2
        slope = float(np.polyfit(ts[half:], kb[half:], 1)[0] * 60) if len(ts) - half >= 3 else 0.0
        out[name] = {
            "first_kb": int(kb[0]),
            "last_kb": int(kb[-1]),
            "peak_kb": int(kb.max()),
            "second_half_slope_kb_per_min": round(slope, 1),
        }
    return out


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=180)
    ap.add_argument("--realtime-clients", type=int, default=2)
    ap.add_argument("--job-size", type=int, default=300)
    ap.add_argument("--sample-s", type=float, default=5)
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tagpipe-soak-") as tmp:
        cfg = StackConfig(
            data_dir=Path(tmp),
            model_dir=args.model_dir,
            downloaders=2,
            inference=2,
            allow_cidrs="127.0.0.0/8",
            inference_env={"TAGPIPE_INTRA_OP_THREADS": "1"},
            gateway_env={"TAGPIPE_REALTIME_TIMEOUT_S": "60"},
            downloader_env={"TAGPIPE_DECODE_WORKERS": "1"},
        )
        with Stack(cfg) as stack:  # started from the main thread (PDEATHSIG is per thread)
            t = asyncio.run(drive(stack, args))
            dead = [s.name for s in stack.dead()]
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": {k: str(v) for k, v in vars(args).items()},
        "errors_total": sum(t.errors.values()),
        "errors": dict(t.errors),
        "services_died": dead,
        "realtime_status": dict(t.realtime),
        "realtime_items_ok": t.realtime_items,
        "bulk_jobs_completed": t.bulk_jobs,
        "bulk_items_ok": t.bulk_items,
        "rss_trend": trend(t.rss),
        "rss_samples": t.rss,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}, indent=2))


if __name__ == "__main__":
    main()
