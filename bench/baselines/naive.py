"""The naive monolith: one web app whose handler downloads, decodes and runs
batch-1 inference, as the published system had it before tagpipe.

Written the way a competent engineer would: a plain `def` handler (FastAPI runs
it on its threadpool, so a 50 ms download doesn't block the worker), a pooled
HTTP client per process, the same DCT-scaled JPEG decode, one onnxruntime
thread per worker process (several processes share the cores). What it lacks
by design is what tagpipe adds: batching, a queue, separate scalable stages.

    uvicorn --workers 3 --factory bench.baselines.naive:create_app
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from bench.baselines.imaging import Classifier, ModelFiles, decode_crop


class TagIn(BaseModel):
    url: str
    top_k: int = 5


def create_app() -> FastAPI:
    model_dir = Path(os.environ.get("NAIVE_MODEL_DIR", "models/efficientnet-lite0"))
    threads = int(os.environ.get("NAIVE_ORT_THREADS", "1"))
    files = ModelFiles.load(model_dir)
    clf = Classifier(files, threads)
    clf.classify(np.zeros((1, files.crop, files.crop, 3), dtype=np.uint8))
    http = httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=64))
    app = FastAPI()

    @app.post("/tag")
    def tag(body: TagIn) -> dict[str, Any]:
        resp = http.get(body.url)
        if resp.status_code != 200:
            raise HTTPException(502, f"fetch {resp.status_code}")
        crop = decode_crop(resp.content, files.resize, files.crop)
        (tags,) = clf.classify(crop[None], k=body.top_k)
        return {"url": body.url, "tags": [{"label": lbl, "score": s} for lbl, s in tags]}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
