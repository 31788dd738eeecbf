"""Where each lane's model runs (lanes.py), with the real model: the bulk session is
loaded on the niced bulk thread, so the threads onnxruntime starts for it run at
the bulk priority too, and real-time has a CPU session of its own that starts none.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tagpipe_inference.__main__ import load
from tagpipe_inference.lanes import ModelThreads
from tagpipe_inference.settings import InferenceSettings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's"),
]

NICE = 5


def thread_nices() -> dict[int, int]:
    """Every thread of this process and its nice value (from /proc)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        # a thread that ended meanwhile is left out
        with contextlib.suppress(FileNotFoundError), open(f"/proc/self/task/{tid}/stat") as f:
            out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[16])
    return out


def test_each_lane_runs_its_own_session_at_its_own_priority(model_dir: Path) -> None:
    settings = InferenceSettings(
        model_dir=model_dir, intra_op_threads=2, bulk_decode_nice=NICE, max_batch=4
    )
    base = os.getpriority(os.PRIO_PROCESS, 0)
    niced = min(base + NICE, 19)
    before = set(thread_nices())
    threads = ModelThreads(settings.bulk_decode_nice)
    try:
        bulk = threads.load(lambda rt: load(settings, rt))
        new = Counter(n for tid, n in thread_nices().items() if tid not in before)
        # Each model thread and its session's intra-op thread: the bulk pair niced, the
        # real-time pair at the process's priority.
        assert new[niced] == 2
        assert new[base] >= 2
        realtime = threads.realtime.model
        assert threads.bulk.model is bulk and realtime is not bulk
        assert bulk.on_host_threads and realtime.on_host_threads
        pixels = np.random.default_rng(7).integers(0, 256, (3, *bulk.input_hw, 3), np.uint8)
        np.testing.assert_allclose(realtime.predict(pixels), bulk.predict(pixels), atol=1e-5)
    finally:
        threads.shutdown()


def test_lanes_that_share_batches_share_one_model(model_dir: Path) -> None:
    settings = InferenceSettings(model_dir=model_dir, intra_op_threads=1, mix_lanes=True)
    threads = ModelThreads(settings.bulk_decode_nice)
    try:
        bulk = threads.load(lambda rt: load(settings, rt), apart=not settings.mix_lanes)
        assert threads.realtime.model is bulk
    finally:
        threads.shutdown()
