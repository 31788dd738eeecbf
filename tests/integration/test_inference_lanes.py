"""Where each lane's model runs (lanes.py), with the real model: the bulk session is
loaded on the niced bulk thread, so the threads onnxruntime starts for it run at
the bulk priority too, and real-time has a CPU session of its own that starts none.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from tagpipe_inference.__main__ import load, load_realtime
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
        with open(f"/proc/self/task/{tid}/stat") as f:
            out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[16])
    return out


def test_each_lane_runs_its_own_session_at_its_own_priority(model_dir: Path) -> None:
    settings = InferenceSettings(
        model_dir=model_dir, intra_op_threads=2, bulk_decode_nice=NICE, max_batch=4
    )
    base = os.getpriority(os.PRIO_PROCESS, 0)
    before = set(thread_nices())
    threads = ModelThreads(settings.bulk_decode_nice)
    try:
        bulk = threads.load(lambda: load(settings), lambda b: load_realtime(settings, b))
        new = sorted(n for tid, n in thread_nices().items() if tid not in before)
        # The bulk thread and the bulk session's intra-op thread, niced; the real-time
        # thread at the process's priority, and no thread of the real-time session.
        assert new == [base, base + NICE, base + NICE]
        realtime = threads.realtime.model
        assert threads.bulk.model is bulk and realtime is not bulk
        assert bulk.on_host_threads and realtime.on_host_threads
        pixels = np.random.default_rng(7).integers(0, 256, (3, *bulk.input_hw, 3), np.uint8)
        np.testing.assert_allclose(realtime.predict(pixels), bulk.predict(pixels), atol=1e-5)
    finally:
        threads.shutdown()
