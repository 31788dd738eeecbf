"""Real-time ahead of bulk inside one inference worker: its own model thread and slot.

Measured during `make bench`'s bulk run (2 cores, batches of 4): a real-time item's
`infer_queue_ms` was the tail of its latency (median 46 ms, p95 213 ms). It waited for
a general slot that two bulk batches held (one in the model, one decoding its
originals), then for the model thread behind them. So:

- real-time batches run the model on their own thread at normal priority, and bulk
  batches on one at `bulk_decode_nice` (as bulk decodes): a real-time batch starts at
  once, and the kernel gives it the core before the bulk batch running beside it.
  onnxruntime sessions take concurrent runs; the torch runtime serialises its own.
- one slot is kept for real-time batches: while bulk batches fill the general slots
  the worker still fetches the real-time lane, and only it, with the reserve.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from tagpipe_common.threads import niced_pool


class ModelThread:
    """One thread that runs batches back to back, and whether a batch is inside it
    (preprocess + run): a batch collected meanwhile cannot start on it anyway, so it
    keeps taking what arrives until then (the worker's top-up)."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.idle = asyncio.Event()
        self.idle.set()
        self._inside = 0

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

    def of(self, realtime: bool) -> ModelThread:
        return self.realtime if realtime else self.bulk

    def shutdown(self) -> None:
        for t in (self.realtime, self.bulk):
            t.pool.shutdown(wait=True)


class Slots:
    """`depth` general slots (batches in flight) and one reserve for real-time."""

    def __init__(self, depth: int) -> None:
        self.general = asyncio.Semaphore(depth)
        self.reserve = asyncio.Semaphore(1)
        self._freed = asyncio.Event()

    async def take(self) -> asyncio.Semaphore:
        """A general slot when one is free, else the real-time reserve (whose batch
        may hold real-time items only); waits while both are taken."""
        while True:
            for sem in (self.general, self.reserve):
                if not sem.locked():
                    await sem.acquire()
                    return sem
            self._freed.clear()
            await self._freed.wait()

    def give(self, sem: asyncio.Semaphore) -> None:
        sem.release()
        self._freed.set()
