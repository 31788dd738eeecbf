"""End-to-end benchmark: tagpipe against the machine's limit, a naive monolith
and a Ray Serve peer, on the same machine, corpus and image server, in one run.

    python -m bench.bench_e2e --images 800 --latency-ms 50     (what `make bench` runs)

Each system gets the same warm-up, then a bulk run over the corpus with an
open-loop real-time load (one image per request) alongside it. Results go to
bench/results/e2e.json, a chart next to it, and a table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.baselines import corpus as corpus_mod
from bench.baselines import load, report
from bench.baselines.cpu import CpuMeter
from bench.baselines.ideal import run_ideal
from bench.baselines.runners import (
    MODEL_DIR,
    ROOT,
    bench_naive,
    bench_ray,
    best_of,
    process,
)
from bench.timeline import Timeline


def machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import onnxruntime

    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def bench_ideal(images: list[bytes], harness: tuple[int, ...] = ()) -> dict[str, Any]:
    """The best of a small sweep: the limit is what the best setting reaches."""
    runs = []
    for kw in ({"ort_threads": 1}, {"ort_threads": 2}, {"ort_threads": 1, "batch": 8}):
        meter = CpuMeter(include_self=True, exclude=set(harness))
        meter.start()
        r = run_ideal(images, MODEL_DIR, **kw)
        r["cpu"] = meter.stop(r["images"])
        print(f"  ideal {r['settings']}: {r['images_per_s']} img/s", flush=True)
        runs.append(r)
    best = max(runs, key=lambda r: r["images_per_s"])
    sweep = [{**r["settings"], "images_per_s": r["images_per_s"], "cpu": r["cpu"]} for r in runs]
    return {**best, "sweep": sweep}


# tagpipe on 2 cores: the defaults (derived from the cores: 2 decode threads,
# 64 items in flight), and the setting an operator would pick for this box: one
# onnxruntime thread (decode needs the other core), a 50 ms batch window (CPU
# batching saves a little per image) for small batches (onnxruntime's
# CPU cost per image is lowest at 1-8, ~2 ms under batch 32's, and a batch holds
# the session ~80 ms rather than ~350 ms ahead of a real-time item), and 128
# items in flight: a deeper buffer in front of the decode threads keeps both
# cores busy through clumps of 12 MP photos (the decode queue is lane-ordered,
# so real-time items do not wait behind it). The naive and Ray peers already
# keep 1.9 of 2 cores busy at 64 requests in flight, so a deeper window would
# not help them. And `original` on the inference hop: a small JPEG crosses as
# downloaded and inference decodes it to the same crop, which on one node
# saves the downloader's decode hand-off and the bigger frame (0.2-1.6 ms per
# such photo); the 12 MP photos still go raw. With it inference decodes the
# thumbnails and becomes the stage behind, so a real-time item waits for the
# bulk batch in the model: batches of 4 rather than 8 halve that wait (same-run
# sweep on 2026-11-30: p95 255 ms at batch 4, 460 at 8, 322 at 2; 66.7, 61.9 and
# 57.7 img/s).
TAGPIPE_CONFIGS: list[dict[str, dict[str, str]]] = [
    {"downloader_env": {}, "inference_env": {}},
    {
        "downloader_env": {"TAGPIPE_MAX_INFLIGHT": "128", "TAGPIPE_HOP_ENCODING": "original"},
        "inference_env": {
            "TAGPIPE_INTRA_OP_THREADS": "1",
            "TAGPIPE_MAX_WAIT_MS": "50",
            "TAGPIPE_MAX_BATCH": "4",
        },
    },
]


async def bench_tagpipe(
    urls: list[str], rt_urls: list[str], args: argparse.Namespace, nats_servers: int = 1
) -> dict[str, Any]:
    runs = []
    for conf in TAGPIPE_CONFIGS:
        runs.append(await _tagpipe_once(urls, rt_urls, args, conf, nats_servers))
        print(f"  tagpipe {runs[-1]['settings']}: {runs[-1]['images_per_s']} img/s", flush=True)
    return best_of(runs)


async def bench_tagpipe_r3(
    urls: list[str], rt_urls: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """The same, on a 3-server JetStream cluster with every stream at 3 replicas: what
    replication costs (each publish and ack is stored by a quorum before it returns)."""
    return await bench_tagpipe(urls, rt_urls, args, nats_servers=3)


async def _tagpipe_once(
    urls: list[str],
    rt_urls: list[str],
    args: argparse.Namespace,
    conf: dict[str, dict[str, str]],
    nats_servers: int = 1,
) -> dict[str, Any]:
    from tagpipe_cli.stack import Stack, StackConfig

    cfg = StackConfig(
        data_dir=ROOT / ".tagpipe" / "bench-stack",
        downloaders=args.downloaders,
        inference=1,
        model_dir=MODEL_DIR,
        allow_cidrs="127.0.0.0/8",
        fresh=True,
        downloader_env=conf["downloader_env"],
        inference_env=conf["inference_env"],
        nats_servers=nats_servers,
    )
    stack = await asyncio.to_thread(Stack(cfg).start)
    try:
        base = stack.gateway_url
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

            async def realtime(url: str) -> bool:
                async with s.post(f"{base}/v1/tags", json={"url": url}) as r:
                    body = await r.json(content_type=None)
                    return r.status == 200 and body["items"][0]["status"] == "ok"

            await load.closed_loop(realtime, rt_urls[:16], 8)  # warm-up, as for the others
            meter = CpuMeter(exclude=set(args.harness_pids))
            meter.start()
            stop = asyncio.Event()
            rt_task = asyncio.create_task(load.open_loop(realtime, rt_urls, args.rt_rate, stop))
            async with Timeline(stack) as timeline:
                _, bulk = await bulk_job(s, base, urls, stack)
            stop.set()
            rt = await rt_task
            cpu = meter.stop(bulk["ok"] + rt.ok)
    finally:
        await asyncio.to_thread(stack.stop)
    settings = {
        "processes": 1 + args.downloaders + 1,
        "downloaders": args.downloaders,
        "downloader_env": cfg.downloader_env,
        "inference_env": cfg.inference_env,
        "nats_servers": nats_servers,
        "stream_replicas": stack.stream_replicas,
    }
    return {
        **bulk,
        "realtime": rt.summary(),
        "cpu": cpu,
        "settings": settings,
        "timeline": {"summary": timeline.summary(), "every_s": timeline.every_s},
        "timeline_rows": timeline.rows,
    }


async def bulk_job(
    s: aiohttp.ClientSession, base: str, urls: list[str], stack: Any, timeout_s: float = 300.0
) -> tuple[str, dict[str, Any]]:
    """Submit one job with every URL; time from submission to the last result. Returns
    the job id (to read its results) and the timing.

    A service that dies mid-run fails the measurement at once, with its log.
    """
    t0 = time.perf_counter()
    async with s.post(f"{base}/v1/jobs", json=urls) as r:
        created = await r.json()
        if r.status != 202:
            raise RuntimeError(f"job submission: {r.status} {created}")
    status: dict[str, Any] = {}
    while True:
        async with s.get(f"{base}/v1/jobs/{created['job_id']}") as r:
            status = await r.json()
        if status.get("total") and status["finished"] >= status["total"]:
            break
        if dead := stack.dead():
            raise RuntimeError(f"{dead[0].name} died: {dead[0].log_tail(600)}")
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"job unfinished after {timeout_s:g} s: {status}")
        await asyncio.sleep(0.1)
    seconds = time.perf_counter() - t0
    return created["job_id"], {
        "ok": status["done"],
        "failed": status["failed"],
        "seconds": round(seconds, 3),
        "images_per_s": round(status["done"] / seconds, 2),
    }


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    mix = {k: float(v) for k, v in (p.split("=") for p in args.mix.split(","))}
    corpus = corpus_mod.build(ROOT / ".tagpipe" / "bench-corpus", args.images, mix)
    rt_corpus = corpus_mod.build(ROOT / ".tagpipe" / "bench-corpus", args.rt_images, mix)
    doc: dict[str, Any] = {
        "benchmark": "e2e",
        "machine": machine(),
        "corpus": {
            "images": args.images,
            "mix": mix,
            "latency_ms": args.latency_ms,
            "sizes": {k: f"{w}x{h}" for k, (w, h) in corpus_mod.SIZES.items()},
        },
        "realtime_rate": args.rt_rate,
        "systems": {},
    }
    systems: dict[str, Any] = doc["systems"]
    images = corpus.load() if "ideal" in args.systems else []
    first: dict[str, Any] | None = None
    if images:
        print("ideal ...", flush=True)
        first = await asyncio.to_thread(bench_ideal, images)
    server_cmd = [
        sys.executable,
        "-m",
        "bench.baselines.corpus",
        "--dir",
        str(ROOT / ".tagpipe" / "bench-corpus"),
        "--latency-ms",
        str(args.latency_ms),
    ]
    with process(server_cmd, stdout=subprocess.PIPE) as srv:
        assert srv.stdout is not None
        img_base = (await asyncio.to_thread(srv.stdout.readline)).strip()
        args.harness_pids = (srv.pid,)
        urls = [f"{img_base}/img/{n}" for n in corpus.names]
        rt_urls = [f"{img_base}/img/{n}~rt" for n in rt_corpus.names]
        runners = {
            "tagpipe": bench_tagpipe,
            "tagpipe_r3": bench_tagpipe_r3,
            "naive": bench_naive,
            "ray_serve": bench_ray,
        }
        for name, fn in runners.items():
            if name not in args.systems:
                continue
            print(f"{name} ...", flush=True)
            adjacent = await asyncio.to_thread(_adjacent_ideal, images, first, args.harness_pids)
            t0 = time.perf_counter()
            try:
                systems[name] = await fn(urls, rt_urls, args)
            except Exception as exc:  # record the exact failure; the other systems still run
                systems[name] = {"error": f"{type(exc).__name__}: {exc}"}
            if adjacent:
                systems[name]["adjacent_ideal"] = adjacent
            print(
                f"  {name}: {systems[name].get('images_per_s', systems[name].get('error'))}"
                f" ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    if "settings" in systems.get("tagpipe", {}):
        doc["hop"] = hop_figures(systems["tagpipe"]["settings"]["downloader_env"])
    if images and first is not None:
        # Again at the end: on a shared box the limit is the better of the two
        # brackets, so background load can't make the others look closer to it.
        print("ideal again ...", flush=True)
        last = await asyncio.to_thread(bench_ideal, images, args.harness_pids)
        systems["ideal"] = max(first, last, key=lambda r: r["images_per_s"])
        systems["ideal"]["brackets"] = [first["images_per_s"], last["images_per_s"]]
        # Its CPU cost: the cheapest setting seen in either bracket.
        every = first["sweep"] + last["sweep"]
        systems["ideal"]["cpu"] = min((r["cpu"] for r in every), key=_cpu_ms)
    finish(doc)
    return doc


def hop_figures(downloader_env: dict[str, str]) -> dict[str, Any]:
    """Bytes and top-1 agreement of the hop encoding tagpipe ran with, as `make
    bench-hop` measured them on real photographs (the corpus here is generated)."""
    from tagpipe_downloader.settings import DownloaderSettings

    enc = downloader_env.get("TAGPIPE_HOP_ENCODING", DownloaderSettings().hop_encoding)
    if enc == "raw":
        return {"encoding": "raw", "bytes_median": 224 * 224 * 3, "top1_agreement": 1.0}
    path = ROOT / "bench" / "results" / "hop-encoding.json"
    measured = json.loads(path.read_text())["encodings"] if path.exists() else {}
    for label, r in measured.items():
        if label.endswith(f"(hop: {enc})"):
            keep = ("bytes_median", "bytes_p90", "top1_agreement", "top1_agreement_whole_photos")
            return {"encoding": enc, "source": path.name, **{k: r[k] for k in keep if k in r}}
    return {"encoding": enc, "error": f"not measured: run make bench-hop ({path.name})"}


def _adjacent_ideal(
    images: list[bytes], first: dict[str, Any] | None, harness: tuple[int, ...]
) -> dict[str, Any] | None:
    """The ideal loop (its best setting, on part of the corpus) right before a
    system runs: on a shared box, the limit at that moment is the fair yardstick
    for that system's wall-clock figure."""
    if not images or first is None:
        return None
    settings = first["settings"]
    meter = CpuMeter(include_self=True, exclude=set(harness))
    meter.start()
    r = run_ideal(
        images[: max(64, len(images) // 3)],
        MODEL_DIR,
        batch=settings["batch"],
        ort_threads=settings["ort_threads"],
    )
    cpu = meter.stop(r["images"])
    return {"images_per_s": r["images_per_s"], "other_cores_busy": cpu["other_cores_busy"]}


def _cpu_ms(cpu: dict[str, float]) -> float:
    return cpu["cpu_ms_per_image"]


def _better(key: str, ours: float, theirs: float) -> float:
    """How many times better ours is: more images/s, or fewer CPU ms per image."""
    return theirs / ours if key == "cpu_ms" else ours / theirs


def _metric(system: dict[str, Any], key: str) -> float | None:
    if key == "cpu_ms":
        return (system.get("cpu") or {}).get("cpu_ms_per_image")
    return system.get(key)


# Issue #13's goals, from one run: (view, metric, against, at least this many times better).
GOALS = (
    ("CPU cost", "cpu_ms", "ideal", 0.87),
    ("wall clock", "images_per_s", "naive", 1.0),
    ("wall clock", "images_per_s", "ray_serve", 1.5),
)
RT_P95_GOAL_MS = 300.0


def finish(doc: dict[str, Any]) -> None:
    """Ratios against the ideal, and the goals, stated with their margins.

    Two views: wall-clock images/s (what happened, neighbours and all) and CPU
    cost per image, whose ratio to the ideal's says how close the system would
    come on dedicated cores if it kept them busy.
    """
    systems = doc["systems"]
    ideal = systems.get("ideal", {}).get("images_per_s")
    ideal_cpu = systems.get("ideal", {}).get("cpu", {}).get("cpu_ms_per_image")
    cores = doc["machine"]["cores"] or 1
    for s in systems.values():
        if ideal and "images_per_s" in s:
            s["vs_ideal"] = round(s["images_per_s"] / ideal, 3)
        adjacent = (s.get("adjacent_ideal") or {}).get("images_per_s")
        if adjacent and "images_per_s" in s:
            s["vs_adjacent_ideal"] = round(s["images_per_s"] / adjacent, 3)
        cpu_ms = s.get("cpu", {}).get("cpu_ms_per_image")
        if cpu_ms:
            s["cpu_bound_images_per_s"] = round(cores * 1000 / cpu_ms, 1)
            if ideal_cpu:
                s["cpu_vs_ideal"] = round(ideal_cpu / cpu_ms, 3)
    goals: dict[str, str] = {}
    tp_adj = systems.get("tagpipe", {}).get("vs_adjacent_ideal")
    if tp_adj:
        verdict = "met" if tp_adj >= 0.7 else "MISSED"
        goals["wall clock vs the ideal run just before: tagpipe >= 0.7x"] = (
            f"{tp_adj:.2f}x ({verdict})"
        )
    for view, key, other, need in GOALS:
        tp, theirs = _metric(systems.get("tagpipe", {}), key), _metric(systems.get(other, {}), key)
        if tp and theirs:
            r = _better(key, tp, theirs)
            verdict = "met" if r >= need else "MISSED"
            goals[f"{view}: tagpipe >= {need:g}x {other}"] = f"{r:.2f}x ({verdict})"
    p95 = (systems.get("tagpipe", {}).get("realtime") or {}).get("p95_ms")
    if p95:
        verdict = "met" if p95 <= RT_P95_GOAL_MS else "MISSED"
        goals[f"real-time p95 <= {RT_P95_GOAL_MS:g} ms"] = f"{p95:,.0f} ms ({verdict})"
    hop = doc.get("hop")
    if hop and "bytes_median" in hop:
        ok = hop["bytes_median"] <= 30_000 and hop["top1_agreement"] >= 0.995
        goals["inference hop: median <= 30 KB, top-1 agreement >= 99.5 % (real photos)"] = (
            f"{hop['encoding']}: {hop['bytes_median'] / 1000:.1f} KB, "
            f"{hop['top1_agreement']:.1%} ({'met' if ok else 'MISSED'})"
        )
    doc["goals"] = goals
    r1, r3 = systems.get("tagpipe", {}), systems.get("tagpipe_r3", {})
    if "images_per_s" in r1 and "images_per_s" in r3:
        cpu1, cpu3 = _metric(r1, "cpu_ms"), _metric(r3, "cpu_ms")
        doc["replication"] = {
            "images_per_s_r3_over_r1": round(r3["images_per_s"] / r1["images_per_s"], 3),
            "cpu_ms_per_image_r3_over_r1": round(cpu3 / cpu1, 3) if cpu1 and cpu3 else None,
        }
    doc["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=800, help="bulk corpus size")
    ap.add_argument("--rt-images", type=int, default=200, help="distinct real-time URLs")
    ap.add_argument("--mix", default="thumb=0.8,phone=0.2")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="image server latency")
    ap.add_argument("--rt-rate", type=float, default=2.0, help="real-time requests/s")
    ap.add_argument(
        "--concurrency", type=int, default=64, help="bulk requests in flight (HTTP systems)"
    )
    ap.add_argument("--workers", type=int, default=3, help="naive worker processes (= tagpipe's)")
    ap.add_argument("--downloaders", type=int, default=1)
    ap.add_argument(
        "--ray-config",
        dest="ray_configs",
        action="append",
        default=[],
        type=lambda s: tuple(int(x) for x in s.split("x")),
        metavar="REPLICASxTHREADS",
    )
    ap.add_argument("--systems", default="ideal,tagpipe,tagpipe_r3,naive,ray_serve")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    args.systems = set(args.systems.split(","))
    args.ray_configs = args.ray_configs or [(1, 2), (2, 1)]
    doc = asyncio.run(run_all(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    report.chart(doc, args.out.with_suffix(".png"))
    report.splice(args.md, report.markdown(doc))
    print(report.markdown(doc))


if __name__ == "__main__":
    main()
