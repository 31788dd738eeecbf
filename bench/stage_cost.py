"""What each process of the pipeline costs per image, against the bare work.

    python -m bench.stage_cost [--hop raw original] [--images 1200]

The local stack (`tagpipe_cli.stack`, the 2-core setting of `make bench`) tags
a bulk job of 640x480 photo-like JPEGs from an image server with no latency;
each process's CPU (psutil: user + system) over the job, per image, is set
against the bare costs of the same images measured in this process: the
downloader's decode and crop (`decode_image`) and onnxruntime at batch 4 on
one thread. What is left over is each stage's overhead: the pipeline's own
cost. One run per hop encoding, side by side, in bench/results/stage-cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
from tagpipe_cli.servers import free_port
from tagpipe_cli.stack import Stack, StackConfig
from tagpipe_downloader.decode import Geometry, decode_image

from bench.baselines.imaging import Classifier, ModelFiles
from bench.bench_e2e import MODEL_DIR, ROOT, TAGPIPE_CONFIGS, bulk_job

SEEDS = 64  # distinct photos; every URL is distinct, so nothing is cached


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


async def _photos(base: str) -> list[bytes]:
    async with aiohttp.ClientSession() as s:
        out = []
        for i in range(SEEDS):
            async with s.get(f"{base}/corpus/640x480/{i}.jpg") as r:
                out.append(await r.read())
        return out


async def run_stack(base: str, hop: str, images: int) -> dict[str, Any]:
    tuning = TAGPIPE_CONFIGS[-1]
    cfg = StackConfig(
        data_dir=ROOT / ".tagpipe" / "stage-cost",
        model_dir=MODEL_DIR,
        allow_cidrs="127.0.0.0/8",
        fresh=True,
        downloader_env={**tuning["downloader_env"], "TAGPIPE_HOP_ENCODING": hop},
        inference_env=tuning["inference_env"],
    )
    stack = await asyncio.to_thread(Stack(cfg).start)
    try:
        procs = {sv.name: psutil.Process(sv.proc.pid) for sv in stack.services if sv.proc}
        for srv in stack.server_processes:
            if srv.proc is not None:
                procs[srv.name] = psutil.Process(srv.proc.pid)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            warm = [f"{base}/corpus/640x480/{i % SEEDS}.jpg?warm={i}" for i in range(64)]
            await bulk_job(s, stack.gateway_url, warm, stack)
            before = {k: _cpu(p) for k, p in procs.items()}
            urls = [f"{base}/corpus/640x480/{i % SEEDS}.jpg?i={i}" for i in range(images)]
            _, bulk = await bulk_job(s, stack.gateway_url, urls, stack)
            after = {k: _cpu(p) for k, p in procs.items()}
    finally:
        await asyncio.to_thread(stack.stop)
    per = {k: round((after[k] - before[k]) * 1000 / images, 2) for k in before}
    return {"bulk": bulk, "cpu_ms_per_image": per, "total": round(sum(per.values()), 2)}


def bare(photos: list[bytes]) -> dict[str, float]:
    """The work itself, in this process: decode and crop, and onnxruntime at batch 4."""
    geom = Geometry.from_manifest(MODEL_DIR)
    t0 = time.process_time()
    crops = [decode_image(b, geom, 50_000_000).pixels for _ in range(3) for b in photos]
    decode_ms = (time.process_time() - t0) * 1000 / len(crops)
    clf = Classifier(ModelFiles.load(MODEL_DIR), threads=1)
    batch = np.stack(crops[:SEEDS])
    clf.classify(batch[:4])
    t0 = time.process_time()
    for _ in range(3):
        for j in range(0, SEEDS, 4):
            clf.classify(batch[j : j + 4])
    ort_ms = (time.process_time() - t0) * 1000 / (3 * SEEDS)
    return {"decode_crop_ms": round(decode_ms, 2), "onnxruntime_batch4_ms": round(ort_ms, 2)}


async def main_async(args: argparse.Namespace, base: str) -> dict[str, Any]:
    await asyncio.sleep(1.5)  # the image server starting
    photos = await _photos(base)
    runs = {hop: await run_stack(base, hop, args.images) for hop in args.hop}
    work = bare(photos)
    for r in runs.values():
        cpu = r["cpu_ms_per_image"]
        r["overhead_ms"] = {
            "downloader": round(cpu.get("downloader-0", 0.0) - work["decode_crop_ms"], 2),
            "inference": round(cpu.get("inference-0", 0.0) - work["onnxruntime_batch4_ms"], 2),
            "whole pipeline": round(r["total"] - sum(work.values()), 2),
        }
    return {
        "benchmark": "stage-cost",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count()},
        "photos": f"{SEEDS} distinct 640x480 JPEGs, {args.images} URLs, no server latency",
        "settings": TAGPIPE_CONFIGS[-1],
        "bare": work,
        "runs": runs,
        "note": "with original the decode moves to inference: compare the whole pipeline's",
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hop", nargs="+", default=["raw", "original"])
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stage-cost.json")
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.imageserver", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        doc = asyncio.run(main_async(args, f"http://127.0.0.1:{port}"))
    finally:
        server.terminate()
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"bare": doc["bare"], "runs": doc["runs"]}, indent=1))


if __name__ == "__main__":
    main()
