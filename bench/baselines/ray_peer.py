"""The peer: Ray Serve serving the same ONNX model, URL in -> tags out.

Tuned the way Ray Serve's docs tell users to: `@serve.batch` for dynamic
batching (max_batch_size, batch_wait_timeout_s), async handlers so many
downloads overlap, CPU work (decode, inference) off the event loop in threads,
`max_ongoing_requests` high enough to keep a batch full. Replica count and
threads are flags so the benchmark can pick the best setting for the cores.

    python -m bench.baselines.ray_peer --port 8123 --replicas 1 --ort-threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from ray import serve
from starlette.requests import Request

from bench.baselines.imaging import U8, Classifier, ModelFiles, decode_crop


@serve.deployment
class Tagger:
    def __init__(
        self, model_dir: str, ort_threads: int, decode_threads: int, max_batch: int, wait_s: float
    ) -> None:
        self.infer.set_max_batch_size(max_batch)  # type: ignore[attr-defined]
        self.infer.set_batch_wait_timeout_s(wait_s)  # type: ignore[attr-defined]
        self.files = ModelFiles.load(Path(model_dir))
        self.clf = Classifier(self.files, ort_threads)
        self.clf.classify(np.zeros((1, self.files.crop, self.files.crop, 3), dtype=np.uint8))
        self.decode_pool = ThreadPoolExecutor(decode_threads)
        self.infer_pool = ThreadPoolExecutor(1)
        self.http: aiohttp.ClientSession | None = None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def infer(self, crops: list[U8]) -> list[list[tuple[str, float]]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.infer_pool, self.clf.classify, np.stack(crops))

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        if self.http is None:
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128))
        async with self.http.get(body["url"]) as resp:
            resp.raise_for_status()
            data = await resp.read()
        loop = asyncio.get_running_loop()
        crop = await loop.run_in_executor(
            self.decode_pool, decode_crop, data, self.files.resize, self.files.crop
        )
        tags = await self.infer(crop)
        return {"url": body["url"], "tags": [{"label": lbl, "score": s} for lbl, s in tags]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model-dir", default="models/efficientnet-lite0")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--ort-threads", type=int, default=2)
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-wait-s", type=float, default=0.02)
    ap.add_argument("--max-ongoing", type=int, default=64)
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    app = Tagger.options(  # type: ignore[attr-defined]
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing,
        # Threads, not Ray CPUs, decide the parallelism: don't let Ray's
        # accounting refuse a second replica on a 2-core box.
        ray_actor_options={"num_cpus": 0},
    ).bind(
        str(Path(args.model_dir).resolve()),
        args.ort_threads,
        args.decode_threads,
        args.max_batch,
        args.batch_wait_s,
    )
    serve.run(app, route_prefix="/tag", blocking=False)
    print(f"READY http://127.0.0.1:{args.port}/tag", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop:
        time.sleep(0.2)
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


if __name__ == "__main__":
    main()
