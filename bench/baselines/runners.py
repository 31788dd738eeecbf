"""Runners for the HTTP systems (naive monolith, Ray Serve peer) and their harness.

Each runner starts the system in its own process, warms it up, then drives the
bulk run with the open-loop real-time load alongside and meters its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from bench.baselines import load
from bench.baselines.cpu import CpuMeter

ROOT = Path(__file__).resolve().parent.parent.parent
MODEL_DIR = ROOT / "models" / "efficientnet-lite0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def process(
    cmd: list[str], env: dict[str, str] | None = None, **kw: Any
) -> Iterator[subprocess.Popen[str]]:
    """A child process that is always terminated (then killed) on the way out."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, text=True, **kw)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_http(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout_s:g} s")


async def run_with_realtime(
    bulk: load.Call,
    realtime: load.Call,
    urls: list[str],
    rt_urls: list[str],
    concurrency: int,
    rt_rate: float,
    exclude: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Warm up, then the bulk run with the open-loop real-time load alongside."""
    await load.closed_loop(bulk, rt_urls[:16], min(8, concurrency))
    meter = CpuMeter(exclude=set(exclude))
    meter.start()
    stop = asyncio.Event()
    rt_task = asyncio.create_task(load.open_loop(realtime, rt_urls, rt_rate, stop))
    res = await load.closed_loop(bulk, urls, concurrency)
    stop.set()
    rt = await rt_task
    return {
        **res.summary(),
        "concurrency": concurrency,
        "realtime": rt.summary(),
        "cpu": meter.stop(res.ok + rt.ok),
    }


def _post_json(session: aiohttp.ClientSession, endpoint: str) -> load.Call:
    async def call(url: str) -> bool:
        async with session.post(endpoint, json={"url": url}) as r:
            body = await r.json(content_type=None)
            return r.status == 200 and bool(body.get("tags"))

    return call


async def bench_naive(
    urls: list[str], rt_urls: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    runs = []
    for threads in (1, 2):
        runs.append(await _naive_once(urls, rt_urls, args, threads))
        print(f"  naive {runs[-1]['settings']}: {runs[-1]['images_per_s']} img/s", flush=True)
    return best_of(runs)


async def _naive_once(
    urls: list[str], rt_urls: list[str], args: argparse.Namespace, threads: int
) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.baselines.naive:create_app", "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)]
    cmd += ["--log-level", "warning", "--no-access-log"]
    env = {"NAIVE_MODEL_DIR": str(MODEL_DIR), "NAIVE_ORT_THREADS": str(threads)}
    with process(cmd, env):
        await wait_http(f"http://127.0.0.1:{port}/healthz")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            call = _post_json(s, f"http://127.0.0.1:{port}/tag")
            out = await run_with_realtime(
                call, call, urls, rt_urls, args.concurrency, args.rt_rate, args.harness_pids
            )
    return {**out, "settings": {"workers": args.workers, "ort_threads": threads}}


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every system gets a small sweep and is reported at its best setting."""
    best = max(runs, key=lambda r: r["images_per_s"])
    keep = ("images_per_s", "settings", "cpu", "realtime", "timeline")
    return {**best, "sweep": [{k: r[k] for k in keep if k in r} for r in runs]}


async def bench_ray(
    urls: list[str], rt_urls: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    runs = []
    for replicas, ort_threads in args.ray_configs:
        port = free_port()
        settings = {
            "replicas": replicas,
            "ort_threads": ort_threads,
            "decode_threads": 2,
            "max_batch_size": 32,
            "batch_wait_timeout_s": 0.02,
            "max_ongoing_requests": 64,
        }
        cmd = [
            sys.executable,
            "-m",
            "bench.baselines.ray_peer",
            "--port",
            str(port),
            "--model-dir",
            str(MODEL_DIR),
            "--replicas",
            str(replicas),
            "--ort-threads",
            str(ort_threads),
        ]
        with process(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line.startswith("READY"):
                raise RuntimeError(f"ray_peer exited {proc.poll()}: {line.strip()!r}")
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                call = _post_json(s, f"http://127.0.0.1:{port}/tag")
                out = await run_with_realtime(
                    call, call, urls, rt_urls, args.concurrency, args.rt_rate, args.harness_pids
                )
        out["settings"] = settings
        print(f"  ray {settings}: {out['images_per_s']} img/s", flush=True)
        runs.append(out)
    return best_of(runs)
