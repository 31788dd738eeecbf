"""Content-addressed dedupe: tagpipe with TAGPIPE_CONTENT_DEDUPE off and on, side
by side in one run, on one corpus where a share of the requests (30 % by
default) are byte-identical copies of another request's image at another URL.

    python -m bench.bench_dedupe --images 400 --dup 0.3    (what `make bench-dedupe` runs)

The corpus and its image server are the e2e benchmark's (bench/baselines/corpus.py):
each request has its own URL, the duplicates share their bytes with an original.
Each setting runs `--rounds` times, alternating, with a fresh stack each time, as
one bulk job of every URL; a warm-up on images outside the corpus comes first, so
the cache starts empty. Measured per run: images/s, the stack's CPU ms per image,
cache hits (of the duplicates, the ones whose original had finished in time), and
whether cached tags equal the tags the model gave the original (same run) and the
dedupe-off run's tags for the same bytes. Writes bench/results/dedupe.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.baselines import corpus as corpus_mod
from bench.baselines.cpu import CpuMeter
from bench.baselines.runners import MODEL_DIR, ROOT, process
from bench.bench_e2e import bulk_job, machine
from bench.imageserver import make_jpeg

CORPUS_DIR = ROOT / ".tagpipe" / "bench-corpus"
WARM_UP = 8  # distinct images, not in the corpus: the cache starts empty either way


def dup_corpus(n: int, dup: float, mix: dict[str, float]) -> list[str]:
    """`n` request names: round(n * (1 - dup)) distinct images, the rest copies of
    random ones among them under names of their own, in a shuffled order."""
    uniques = round(n * (1 - dup))
    base = corpus_mod.build(CORPUS_DIR, uniques, mix, unique=uniques)
    rng = random.Random(2)
    copies = [f"{rng.choice(base.names).split('~')[0]}~dup{j}" for j in range(n - uniques)]
    names = base.names + copies
    rng.shuffle(names)
    for i in range(WARM_UP):
        path = CORPUS_DIR / f"warm-{i}.jpg"
        if not path.exists():
            path.write_bytes(make_jpeg(640, 480, seed=10_000 + i))
    return names


def image_of(url: str) -> str:
    """The image behind a request URL (`.../img/thumb-3~dup7` -> `thumb-3`)."""
    return url.rsplit("/", 1)[-1].split("~")[0]


async def run_once(
    urls: list[str], warm: list[str], dedupe: bool, harness: tuple[int, ...]
) -> dict[str, Any]:
    from tagpipe_cli.stack import Stack, StackConfig

    cfg = StackConfig(
        data_dir=ROOT / ".tagpipe" / "bench-dedupe-stack",
        downloaders=1,
        inference=1,
        model_dir=MODEL_DIR,
        allow_cidrs="127.0.0.0/8",
        fresh=True,
        downloader_env={"TAGPIPE_CONTENT_DEDUPE": str(dedupe).lower()},
    )
    stack = await asyncio.to_thread(Stack(cfg).start)
    try:
        base = stack.gateway_url
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            for url in warm:
                async with s.post(f"{base}/v1/tags", json={"url": url}) as r:
                    await r.read()
            meter = CpuMeter(exclude=set(harness))
            meter.start()
            job_id, run = await bulk_job(s, base, urls, stack, timeout_s=600)
            run["cpu"] = meter.stop(run["ok"])
            lines = await _results(s, base, job_id)
    finally:
        await asyncio.to_thread(stack.stop)
    run["cached"] = sum(1 for x in lines if x.get("cached"))
    run["settings"] = {"downloader_env": cfg.downloader_env}
    return {**run, "lines": lines}


async def _results(s: aiohttp.ClientSession, base: str, job_id: str) -> list[dict[str, Any]]:
    async with s.get(f"{base}/v1/jobs/{job_id}/results") as r:
        body = await r.text()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def _tags(line: dict[str, Any]) -> list[tuple[str, float]]:
    return [(t["label"], t["score"]) for t in line.get("tags", [])]


def _top1(tags: list[tuple[str, float]] | None) -> str | None:
    return tags[0][0] if tags else None


def agreement(on: list[dict[str, Any]], off: list[dict[str, Any]]) -> dict[str, Any]:
    """Cached results against the model's own: the original's in the same run
    (must be identical) and the dedupe-off run's for the same image."""
    inferred = {image_of(x["source"]): _tags(x) for x in on if not x.get("cached")}
    baseline = {image_of(x["source"]): _tags(x) for x in off if x["status"] == "ok"}
    cached = [x for x in on if x.get("cached")]
    same_run = [_tags(x) == inferred.get(image_of(x["source"])) for x in cached]
    vs_off = [(image_of(x["source"]), _tags(x)) for x in cached]
    exact = [baseline.get(img) == tags for img, tags in vs_off]
    top1 = [_top1(baseline.get(img)) == _top1(tags) for img, tags in vs_off]
    return {
        "cached": len(cached),
        "identical_to_original_in_run": sum(same_run),
        "identical_to_dedupe_off_run": sum(exact),
        "top1_equal_to_dedupe_off_run": sum(top1),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str, sub: str | None = None) -> float:
        vals = [(r[sub] if sub else r)[key] for r in runs]
        return round(float(statistics.mean(vals)), 2)

    return {
        "images_per_s": mean("images_per_s"),
        "cpu_ms_per_image": mean("cpu_ms_per_image", "cpu"),
        "cached": mean("cached"),
        "failed": sum(r["failed"] for r in runs),
    }


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    mix = {k: float(v) for k, v in (p.split("=") for p in args.mix.split(","))}
    names = dup_corpus(args.images, args.dup, mix)
    uniques = len({n.split("~")[0] for n in names})
    server = [sys.executable, "-m", "bench.baselines.corpus", "--dir", str(CORPUS_DIR)]
    server += ["--latency-ms", str(args.latency_ms)]
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with process(server, stdout=subprocess.PIPE) as srv:
        assert srv.stdout is not None
        img_base = (await asyncio.to_thread(srv.stdout.readline)).strip()
        urls = [f"{img_base}/img/{n}" for n in names]
        warm = [f"{img_base}/img/warm-{i}" for i in range(WARM_UP)]
        for rnd in range(args.rounds):
            for setting in ("off", "on"):
                run = await run_once(urls, warm, setting == "on", (srv.pid,))
                runs[setting].append(run)
                print(
                    f"  round {rnd + 1} dedupe {setting}: {run['images_per_s']} img/s, "
                    f"{run['cpu']['cpu_ms_per_image']} CPU ms/image, {run['cached']} cached",
                    flush=True,
                )
    for on, off in zip(runs["on"], runs["off"], strict=True):
        on["agreement"] = agreement(on["lines"], off["lines"])
    for rs in runs.values():
        for r in rs:
            del r["lines"]
    off_s, on_s = summarise(runs["off"]), summarise(runs["on"])
    return {
        "benchmark": "dedupe",
        "machine": machine(),
        "corpus": {
            "requests": len(names),
            "distinct_images": uniques,
            "duplicates": len(names) - uniques,
            "mix": mix,
            "latency_ms": args.latency_ms,
            "sizes": {k: f"{w}x{h}" for k, (w, h) in corpus_mod.SIZES.items()},
        },
        "summary": {
            "off": off_s,
            "on": on_s,
            "speedup": round(on_s["images_per_s"] / off_s["images_per_s"], 3),
            "cpu_saving": round(1 - on_s["cpu_ms_per_image"] / off_s["cpu_ms_per_image"], 3),
        },
        "runs": runs,
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=400, help="requests in the bulk job")
    ap.add_argument("--dup", type=float, default=0.3, help="share of byte-identical copies")
    ap.add_argument("--mix", default="thumb=0.8,phone=0.2")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="image server latency")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each setting, alternating")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dedupe.json")
    args = ap.parse_args()
    doc = asyncio.run(run_all(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
