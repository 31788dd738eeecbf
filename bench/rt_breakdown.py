"""Where a real-time item's time goes during a bulk job, stage by stage.

    python -m bench.rt_breakdown --setting default --runs 2      (bench/results/rt-breakdown.json)

`make bench`'s tagpipe run, taken apart: the same local stack, corpus, image server
(50 ms per response) and loads (one bulk job of every URL, 2 real-time requests/s
beside it, after 16 warm-up requests). Every real-time answer carries its item's
`timings` (README: "Stage timings"); this reports each stage's median and p95 over
the answers of the run, the answers' own p50/p95 as the client saw them, and the
bulk job's images/s. A run answers about 30 real-time requests, so a p95 is the
second-slowest: compare runs side by side, on the same box, more than once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.baselines import corpus as corpus_mod
from bench.baselines import load
from bench.baselines.runners import MODEL_DIR, ROOT, process
from bench.bench_e2e import TAGPIPE_CONFIGS, bulk_job, machine

SETTINGS = {"default": TAGPIPE_CONFIGS[0], "tuned": TAGPIPE_CONFIGS[1]}
MIX = {"thumb": 0.8, "phone": 0.2}  # make bench's


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 1)


def stages(answers: list[tuple[float, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each stage's median and p95 over the answers that report it."""
    keys = sorted({k for _, t in answers for k, v in t.items() if v is not None})
    out = {}
    for k in keys:
        vals = [t[k] for _, t in answers if t.get(k) is not None]
        out[k] = {"median_ms": round(statistics.median(vals), 1), "p95_ms": percentile(vals, 0.95)}
    return out


async def one_run(setting: str, urls: list[str], rt_urls: list[str], rate: float) -> dict[str, Any]:
    from tagpipe_cli.stack import Stack, StackConfig

    conf = SETTINGS[setting]
    cfg = StackConfig(
        data_dir=ROOT / ".tagpipe" / "rt-breakdown",
        model_dir=MODEL_DIR,
        allow_cidrs="127.0.0.0/8",
        fresh=True,
        downloader_env=conf["downloader_env"],
        inference_env=conf["inference_env"],
    )
    stack = await asyncio.to_thread(Stack(cfg).start)
    answers: list[tuple[float, dict[str, float]]] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

            async def realtime(url: str) -> bool:
                t0 = time.perf_counter()
                async with s.post(f"{stack.gateway_url}/v1/tags", json={"url": url}) as r:
                    body = await r.json(content_type=None)
                item = body["items"][0]
                answers.append(((time.perf_counter() - t0) * 1000, item.get("timings") or {}))
                return bool(r.status == 200 and item["status"] == "ok")

            await load.closed_loop(realtime, rt_urls[:16], 8)  # warm-up, as make bench
            answers.clear()
            stop = asyncio.Event()
            rt_task = asyncio.create_task(load.open_loop(realtime, rt_urls, rate, stop))
            _, bulk = await bulk_job(s, stack.gateway_url, urls, stack)
            stop.set()
            await rt_task
    finally:
        await asyncio.to_thread(stack.stop)
    client = [ms for ms, _ in answers]
    return {
        "setting": setting,
        "bulk": bulk,
        "realtime": {
            "answers": len(answers),
            "p50_ms": percentile(client, 0.5),
            "p95_ms": percentile(client, 0.95),
        },
        "stages": stages(answers),
    }


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    corpus_dir = ROOT / ".tagpipe" / "bench-corpus"
    corpus = corpus_mod.build(corpus_dir, args.images, MIX)
    rt_corpus = corpus_mod.build(corpus_dir, 200, MIX)
    cmd = [sys.executable, "-m", "bench.baselines.corpus", "--dir", str(corpus_dir)]
    cmd += ["--latency-ms", str(args.latency_ms)]
    runs = []
    with process(cmd, stdout=subprocess.PIPE) as srv:
        assert srv.stdout is not None
        base = (await asyncio.to_thread(srv.stdout.readline)).strip()
        urls = [f"{base}/img/{n}" for n in corpus.names]
        rt_urls = [f"{base}/img/{n}~rt" for n in rt_corpus.names]
        for i in range(args.runs):
            runs.append(await one_run(args.setting, urls, rt_urls, args.rate))
            r = runs[-1]
            print(
                f"run {i + 1}: bulk {r['bulk']['images_per_s']} img/s, real-time "
                f"p50 {r['realtime']['p50_ms']} p95 {r['realtime']['p95_ms']} ms",
                flush=True,
            )
            for k, v in r["stages"].items():
                print(f"  {k:<20} median {v['median_ms']:>7} p95 {v['p95_ms']:>7}", flush=True)
    return {
        "benchmark": "rt-breakdown",
        "command": f"python -m bench.rt_breakdown --setting {args.setting} --runs {args.runs}",
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "corpus": {"images": args.images, "mix": MIX, "latency_ms": args.latency_ms},
        "realtime_rate": args.rate,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--rate", type=float, default=2.0, help="real-time requests/s")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rt-breakdown.json")
    args = ap.parse_args()
    doc = asyncio.run(run_all(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
