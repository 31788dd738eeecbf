"""Real-time ahead of bulk inside one inference worker: its own model thread and slot.

Measured during `make bench`'s bulk run (2 cores, batches of 4): a real-time item's
`infer_queue_ms` was the tail of its latency (median 46 ms, p95 213 ms). It waited for
a general slot that two bulk batches held (one in the model, one decoding its
originals), then for the model thread behind them. So:

- real-time batches run the model on their own thread at normal priority, and bulk
  batches on one at `bulk_decode_nice` (as bulk decodes): a real-time batch starts at
  once, and the kernel gives it the core before the bulk batch running beside it.
  onnxruntime sessions take concurrent runs; the torch runtime serialises its own.
- on the CPU each thread has its own session, loaded on that thread: the threads an
  onnxruntime session starts for itself (its intra-op pool) are born at their
  creator's nice value, so the bulk session's pool runs at the bulk priority and the
  real-time session's at normal priority. The real-time one has no memory arena (its
  batches are small; an arena warmed at the largest batch keeps about 300 MiB).
  With one session shared, its pool ran bulk at normal priority beside real-time
  runs: a real-time item's `inference_ms` had a p95 of 116-230 ms during `make
  bench`'s bulk run (batches of 32, 2 cores); apart, 16-27 ms (docs/benchmarks.md,
  "Real-time apart from bulk in inference"). A GPU session, or
  the torch runtime (whose threads are the process's, and which runs one batch at
  a time), is loaded once, on the real-time thread, and shared.
- each lane's loop has its own slots (collect.py), so a real-time item never waits
  for a slot that bulk batches hold.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from tagpipe_common.threads import niced_pool

from tagpipe_inference.model import Model


class ModelThread:
    """One thread that runs batches back to back, and whether a batch is inside it
    (preprocess + run): a batch collected meanwhile cannot start on it anyway, so it
    keeps taking what arrives until then (the worker's top-up)."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self._model: Model | None = None
        self.idle = asyncio.Event()
        self.idle.set()
        self._inside = 0

    @property
    def model(self) -> Model:
        if self._model is None:
            raise RuntimeError("no model loaded on this thread (ModelThreads.load or .use)")
        return self._model

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self._inside += 1
        self.idle.clear()
        try:
            yield
        finally:
            self._inside -= 1
            if not self._inside:
                self.idle.set()


class ModelThreads:
    """The real-time and the bulk model thread."""

    def __init__(self, bulk_nice: int) -> None:
        self.realtime = ModelThread(ThreadPoolExecutor(1, thread_name_prefix="ort-rt"))
        self.bulk = ModelThread(niced_pool(1, bulk_nice, name="ort"))

    def load(self, loader: Callable[[bool], Model], apart: bool = True) -> Model:
        """Load the real-time model (`loader(True)`) on the real-time thread; where its
        runs are on the host's threads and `apart`, the bulk one (`loader(False)`) on
        the bulk thread, else the same model serves both. Returns the bulk one."""
        rt = self.realtime.pool.submit(loader, True).result()
        bulk = self.bulk.pool.submit(loader, False).result() if apart and rt.on_host_threads else rt
        self.realtime._model, self.bulk._model = rt, bulk
        return bulk

    def use(self, model: Model) -> None:
        """One model, loaded elsewhere, for both threads (tests, benches)."""
        self.bulk._model = self.realtime._model = model

    def of(self, realtime: bool) -> ModelThread:
        return self.realtime if realtime else self.bulk

    def shutdown(self) -> None:
        for t in (self.realtime, self.bulk):
            t.pool.shutdown(wait=True)


class Slots:
    """Batches in flight: `depth` for the bulk loop and `depth` for the real-time
    loop (collect.py), so a real-time item never waits for a bulk batch's slot."""

    def __init__(self, depth: int) -> None:
        self.general = asyncio.Semaphore(depth)
        self.realtime = asyncio.Semaphore(depth)
