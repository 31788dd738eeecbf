"""The ideal: one tight in-process loop over image bytes already in memory.

No network, no queues, no serialisation: a thread pool decodes (Pillow releases
the GIL), the main thread runs batched onnxruntime on the previous batch while
the pool decodes the next. Whatever this reaches is the machine's limit for this
model and corpus; a distributed pipeline on the same cores can only approach it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines.imaging import U8, Classifier, ModelFiles, decode_crop


def run_ideal(
    images: list[bytes],
    model_dir: Path,
    min_images: int = 0,
    batch: int = 32,
    decode_threads: int | None = None,
    ort_threads: int | None = None,
    ahead: int = 2,
) -> dict[str, Any]:
    """Classify `images` (cycled until `min_images`); returns throughput and settings."""
    cores = os.cpu_count() or 1
    decode_threads = decode_threads or cores
    ort_threads = ort_threads or cores
    files = ModelFiles.load(model_dir)
    clf = Classifier(files, ort_threads)
    clf.classify(np.zeros((batch, files.crop, files.crop, 3), dtype=np.uint8))  # warm-up
    total = max(len(images), min_images)
    work = [images[i % len(images)] for i in range(total)]
    chunks = [work[i : i + batch] for i in range(0, total, batch)]
    done = 0
    with ThreadPoolExecutor(decode_threads) as pool:
        pending: deque[list[Future[U8]]] = deque()
        t0 = time.perf_counter()
        for chunk in chunks:
            pending.append([pool.submit(decode_crop, b, files.resize, files.crop) for b in chunk])
            if len(pending) > ahead:
                done += _infer(clf, pending.popleft())
        while pending:
            done += _infer(clf, pending.popleft())
        elapsed = time.perf_counter() - t0
    return {
        "images": done,
        "seconds": round(elapsed, 3),
        "images_per_s": round(done / elapsed, 2),
        "settings": {"batch": batch, "decode_threads": decode_threads, "ort_threads": ort_threads},
    }


def _infer(clf: Classifier, futures: list[Future[U8]]) -> int:
    batch = np.stack([f.result() for f in futures])
    tags = clf.classify(batch)
    assert len(tags) == len(futures)
    return len(tags)
