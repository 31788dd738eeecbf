"""Downloader benchmark: images/s through the real fetch + decode path.

What is measured: `Fetcher.fetch` (pooled aiohttp session, SSRF guard, capped
streaming) from a local aiohttp image server, then `decode_image` (the JPEG
DCT-scaled fast path, EXIF, resize 256 + centre crop 224) in the worker's
thread pool, with many items in flight, exactly as the worker runs them. NATS
and Redis are not in the loop: the number is the download tier's own ceiling.

Also: the decode fast path against a plain full-size decode on 12 MP JPEGs,
single-threaded, in the same run.

    python bench/bench_downloader.py [--out bench/results/downloader.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import features

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tagpipe_downloader.decode import Geometry, decode_image
from tagpipe_downloader.fetch import FetchConfig, Fetcher
from tagpipe_downloader.guard import parse_cidrs
from tagpipe_downloader.settings import DownloaderSettings

from bench.imageserver import make_jpeg

GEOM = Geometry()
MAX_PIXELS = 50_000_000
IN_FLIGHT = int(DownloaderSettings.model_fields["max_inflight"].default)  # the worker default
ROUNDS = 3
SIZES = {"640x480": (640, 480), "4032x3024": (4032, 3024)}


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "note": "shared machine: other workloads may have run concurrently",
    }


async def throughput(
    fetcher: Fetcher, pool: ThreadPoolExecutor, urls: list[str], concurrency: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    stages: dict[str, list[float]] = {"connect": [], "download": [], "decode": [], "preprocess": []}

    async def one(url: str) -> None:
        async with slots:
            got = await fetcher.fetch(url)
            dec = await loop.run_in_executor(pool, decode_image, got.body, GEOM, MAX_PIXELS)
            assert dec.pixels.shape == (224, 224, 3)
            stages["connect"].append(got.connect_ms)
            stages["download"].append(got.download_ms)
            stages["decode"].append(dec.decode_ms)
            stages["preprocess"].append(dec.preprocess_ms)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(u) for u in urls))
    wall = time.perf_counter() - t0
    return {
        "images": len(urls),
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "images_per_s": round(len(urls) / wall, 1),
        "mean_stage_ms": {k: round(statistics.fmean(v), 2) for k, v in stages.items()},
    }


def decode_comparison(blobs: list[bytes], reps: int) -> dict[str, Any]:
    """Fast path vs full decode, alternating so drifting load hits both alike."""
    runs: dict[str, list[tuple[float, float]]] = {"fast": [], "full": []}
    diffs: list[float] = []
    for _ in range(reps):
        for data in blobs:
            a = decode_image(data, GEOM, MAX_PIXELS, fast=True)
            b = decode_image(data, GEOM, MAX_PIXELS, fast=False)
            runs["fast"].append((a.decode_ms, a.preprocess_ms))
            runs["full"].append((b.decode_ms, b.preprocess_ms))
            diff = np.abs(a.pixels.astype(np.int16) - b.pixels.astype(np.int16))
            diffs.append(float(diff.mean()))

    def med(path: str, part: int | None = None) -> float:
        vals = [d + p if part is None else (d, p)[part] for d, p in runs[path]]
        return round(statistics.median(vals), 1)

    return {
        "image": "4032x3024 JPEG q90",
        "what": "one thread, median ms; decode = open + draft + load + EXIF + to RGB, "
        "preprocess = bicubic resize to 256 + centre crop 224",
        "samples": len(diffs),
        "fast_path_ms": {
            "decode": med("fast", 0),
            "preprocess": med("fast", 1),
            "total": med("fast"),
        },
        "full_decode_ms": {
            "decode": med("full", 0),
            "preprocess": med("full", 1),
            "total": med("full"),
        },
        "speedup_total": round(med("full") / med("fast"), 2),
        "mean_abs_pixel_diff_fast_vs_full": round(statistics.fmean(diffs), 2),
    }


def thread_scaling(blobs: list[bytes], threads: int) -> dict[str, Any]:
    """Does the GIL bind? The same 12 MP decodes on one thread, then on `threads`."""
    work = blobs * 2

    def timed(n: int) -> float:
        with ThreadPoolExecutor(n) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda d: decode_image(d, GEOM, MAX_PIXELS), work))
            return time.perf_counter() - t0

    pairs = [(timed(1), timed(threads)) for _ in range(ROUNDS)]
    one = statistics.median(p[0] for p in pairs)
    many = statistics.median(p[1] for p in pairs)
    return {
        "images": len(work),
        "threads": threads,
        "rounds": ROUNDS,
        "one_thread_images_per_s": round(len(work) / one, 1),
        "pool_images_per_s": round(len(work) / many, 1),
        "scaling_median": round(one / many, 2),
        "scaling_per_round": [round(a / b, 2) for a, b in pairs],
    }


@contextlib.contextmanager
def server_process() -> Iterator[str]:
    """The image server in its own process, so it does not share our GIL and loop."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).with_name("imageserver.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port)], stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def run(base: str, quick: bool) -> dict[str, Any]:
    counts = {"640x480": 60 if quick else 300, "4032x3024": 12 if quick else 64}
    distinct = {"640x480": 8, "4032x3024": 4}
    workers = os.cpu_count() or 1
    results: dict[str, Any] = {"machine": machine(), "throughput": {}}
    cfg = FetchConfig(allow=parse_cidrs(["127.0.0.0/8"]), max_bytes=32 * 1024 * 1024)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    async with Fetcher(cfg) as fetcher:
        sizes: dict[str, list[int]] = {}
        for name in SIZES:  # warm-up: the server generates and caches the corpus
            got = [
                await fetcher.fetch(f"{base}/corpus/{name}/{i}.jpg") for i in range(distinct[name])
            ]
            sizes[name] = [len(g.body) for g in got]
        results["mean_jpeg_bytes"] = {k: int(statistics.fmean(v)) for k, v in sizes.items()}
        rounds: dict[str, list[dict[str, Any]]] = {}
        for _ in range(1 if quick else ROUNDS):  # interleaved: load drift hits every config
            for name in SIZES:
                n, k = counts[name], distinct[name]
                for latency in (0, 100):
                    urls = [
                        f"{base}/corpus/{name}/{i % k}.jpg?latency_ms={latency}" for i in range(n)
                    ]
                    res = await throughput(fetcher, pool, urls, concurrency=IN_FLIGHT)
                    rounds.setdefault(f"{name}@{latency}ms", []).append(res)
                    print(f"{name} @ {latency} ms: {res['images_per_s']} images/s", flush=True)
        for key, runs in rounds.items():
            results["throughput"][key] = {
                "images_per_s_median": statistics.median(r["images_per_s"] for r in runs),
                "rounds": runs,
            }
    pool.shutdown()
    w, h = SIZES["4032x3024"]
    blobs = [make_jpeg(w, h, seed=i) for i in range(distinct["4032x3024"])]
    results["decode_fast_path_12mp"] = decode_comparison(blobs, 2 if quick else 4)
    print(json.dumps(results["decode_fast_path_12mp"]), flush=True)
    results["decode_thread_scaling_12mp"] = thread_scaling(blobs, workers)
    print(json.dumps(results["decode_thread_scaling_12mp"]), flush=True)
    results["setup"] = {
        "measured": "Fetcher.fetch + decode_image in a thread pool (the worker's path) "
        "against bench/imageserver.py in a separate process; no NATS/Redis",
        "decode_threads": workers,
        "in_flight": IN_FLIGHT,
        "pool_limit_per_host": cfg.pool_limit_per_host,
        "latency": "server-side sleep before each response",
    }
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/downloader.json"))
    ap.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with server_process() as base:
        results = asyncio.run(run(base, args.quick))
    results["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} in {results['bench_wall_s']} s")


if __name__ == "__main__":
    main()
