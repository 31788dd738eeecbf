"""`make bench-bulk`: a manifest job from moto's S3 server to moto's S3 server on the
local stack, against the same items as an inline job (`POST /v1/jobs`).

For each job size it records images/s (submission to the job's final state), Redis
`used_memory` before, at its peak and after the job (for a manifest job, after the
redelivery window too: max deliver x ack wait, when its exactly-once keys expire), the
gateway's peak RSS, and for the manifest job the output (`_manifest.json`'s counts).

The photos are scikit-image's sample photos (the ImageNet-style set the tag checks use),
JPEG q90, served by a local image server with a WAN-like latency; each item has its own
URL (`?n=`), and content dedupe is off (the default), so every item is fetched, decoded
and inferred. Writes bench/results/bulk.json.

    python -m bench.bench_bulk --sizes 2000,6000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import psutil
import redis.asyncio as aioredis
from PIL import Image
from tagpipe_cli.servers import free_port
from tagpipe_cli.stack import Stack, StackConfig

from bench.bench_e2e import machine
from bench.hop_encoding import photos
from bench.imageserver import ImageServer

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "efficientnet-lite0"
BUCKET = "bench-bulk"
AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Short redelivery settings, so the window after which a manifest job's exactly-once
# keys expire passes within the run (production keeps 5 x 30 s).
WARM_UP = 100  # items of the job run before each measured one
REDELIVERY = {"TAGPIPE_MAX_DELIVER": "3", "TAGPIPE_ACK_WAIT_S": "10"}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a subprocess on a free port; yields its endpoint URL."""
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        s3 = boto3.client("s3", endpoint_url=url, **_creds())
        for _ in range(200):
            with contextlib.suppress(Exception):
                s3.list_buckets()
                break
            time.sleep(0.05)
        s3.create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _creds() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS["AWS_DEFAULT_REGION"],
    }


def jpegs() -> dict[str, bytes]:
    out = {}
    for name, pixels in photos().items():
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out[name] = buf.getvalue()
    return out


class Sampler:
    """Redis used_memory and the gateway's RSS, every `every_s`, while a job runs."""

    def __init__(self, redis_url: str, gateway_pid: int, every_s: float = 0.2) -> None:
        self.redis = aioredis.from_url(redis_url)
        self.gateway = psutil.Process(gateway_pid)
        self.every_s = every_s
        self.redis_peak = 0
        self.rss_peak = 0

    async def used_memory(self) -> int:
        info = await self.redis.info("memory")
        return int(info["used_memory"])

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Sampler]:
        async def loop() -> None:
            while True:
                self.redis_peak = max(self.redis_peak, await self.used_memory())
                self.rss_peak = max(self.rss_peak, self.gateway.memory_info().rss)
                await asyncio.sleep(self.every_s)

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def wait_final(
    s: aiohttp.ClientSession, base: str, job_id: str, stack: Stack
) -> dict[str, Any]:
    while True:
        async with s.get(f"{base}/v1/jobs/{job_id}") as r:
            status: dict[str, Any] = await r.json()
        if status.get("state") in ("completed", "cancelled"):
            return status
        if dead := stack.dead():
            raise RuntimeError(f"{dead[0].name} died: {dead[0].log_tail(600)}")
        await asyncio.sleep(0.25)


async def manifest_job(
    s: aiohttp.ClientSession, stack: Stack, endpoint: str, urls: list[str], run: str
) -> dict[str, Any]:
    s3 = boto3.client("s3", endpoint_url=endpoint, **_creds())
    lines = "".join(json.dumps({"url": u, "id": f"p{i}"}) + "\n" for i, u in enumerate(urls))
    key = f"manifests/{run}.jsonl.gz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=gzip.compress(lines.encode(), mtime=0))
    body = {"source": f"s3://{BUCKET}/{key}", "output": f"s3://{BUCKET}/out/{run}/"}
    t0 = time.perf_counter()
    async with s.post(f"{stack.gateway_url}/v1/manifest-jobs", json=body) as r:
        created = await r.json()
        if r.status != 202:
            raise RuntimeError(f"manifest job: {r.status} {created}")
    status = await wait_final(s, stack.gateway_url, created["job_id"], stack)
    seconds = time.perf_counter() - t0
    got = s3.get_object(Bucket=BUCKET, Key=f"out/{run}/_manifest.json")["Body"].read()
    summary = json.loads(got)
    return {"status": status, "seconds": seconds, "output_manifest": summary}


async def inline_job(s: aiohttp.ClientSession, stack: Stack, urls: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    async with s.post(f"{stack.gateway_url}/v1/jobs", json=urls) as r:
        created = await r.json()
        if r.status != 202:
            raise RuntimeError(f"inline job: {r.status} {created}")
    status = await wait_final(s, stack.gateway_url, created["job_id"], stack)
    return {"status": status, "seconds": time.perf_counter() - t0}


def start_stack(endpoint: str, allow: str) -> Stack:
    aws = {**AWS, "AWS_ENDPOINT_URL": endpoint}
    cfg = StackConfig(
        data_dir=ROOT / ".tagpipe" / "bench-bulk",
        model_dir=MODEL_DIR,
        allow_cidrs=allow,
        fresh=True,
        env={**REDELIVERY, **aws},
    )
    return Stack(cfg).start()


async def measure(
    kind: str, size: int, urls: list[str], endpoint: str, window_s: float
) -> dict[str, Any]:
    stack = await asyncio.to_thread(start_stack, endpoint, "127.0.0.0/8")
    try:
        sampler = Sampler(stack.redis_url, _pid(stack, "gateway"))
        async with aiohttp.ClientSession() as s:
            # A small job of the same kind first: the level "before" is a stack that has
            # run a job (scripts loaded, connections' buffers, the job indexes), so what
            # stays after is what this job leaves, not the first job's one-off costs.
            await run_job(kind, s, stack, endpoint, urls[:WARM_UP], f"{kind}-{size}-warm")
            await asyncio.sleep(window_s)
            before = await sampler.used_memory()
            async with sampler.running():
                got = await run_job(kind, s, stack, endpoint, urls, f"{kind}-{size}")
        after_end = await sampler.used_memory()
        await asyncio.sleep(window_s)  # the redelivery window: exactly-once keys expire
        after_window = await sampler.used_memory()
        await sampler.redis.aclose()
    finally:
        await asyncio.to_thread(stack.stop)
    status = got["status"]
    return {
        "kind": kind,
        "items": size,
        "state": status["state"],
        "done": status.get("done"),
        "failed": status.get("failed"),
        "seconds": round(got["seconds"], 2),
        "images_per_s": round(size / got["seconds"], 1),
        "redis_used_memory": {
            "before": before,
            "peak": sampler.redis_peak,
            "after_job": after_end,
            "after_redelivery_window": after_window,
            "bytes_per_item_after_window": round((after_window - before) / size, 1),
        },
        "gateway_rss_peak_mib": round(sampler.rss_peak / 2**20, 1),
        **({"output_manifest": got["output_manifest"]} if "output_manifest" in got else {}),
    }


async def run_job(
    kind: str, s: aiohttp.ClientSession, stack: Stack, endpoint: str, urls: list[str], run: str
) -> dict[str, Any]:
    if kind == "manifest":
        return await manifest_job(s, stack, endpoint, urls, run)
    return await inline_job(s, stack, urls)


def _pid(stack: Stack, name: str) -> int:
    proc = stack.service(name).proc
    assert proc is not None
    return proc.pid


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    bodies = jpegs()
    window_s = float(REDELIVERY["TAGPIPE_MAX_DELIVER"]) * float(REDELIVERY["TAGPIPE_ACK_WAIT_S"])
    rows = []
    with moto_server() as endpoint:
        async with ImageServer(latency_ms=args.latency_ms) as srv:
            for name, body in bodies.items():
                srv.add(name, body)
            names = list(bodies)
            for size in args.sizes:
                urls = [srv.url(f"/img/{names[i % len(names)]}?n={i}") for i in range(size)]
                for kind in ("manifest", "inline"):
                    rows.append(await measure(kind, size, urls, endpoint, window_s + 5))
                    print(json.dumps(rows[-1]), flush=True)
    return {
        "benchmark": "bulk: manifest job (S3 in, sharded S3 out) vs the same items inline",
        "command": "make bench-bulk",
        "machine": machine(),
        "photos": len(bodies),
        "latency_ms": args.latency_ms,
        "redelivery": REDELIVERY,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,6000", type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--latency-ms", type=float, default=20.0, help="image server latency")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bulk.json")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    doc = asyncio.run(main_async(args))
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
