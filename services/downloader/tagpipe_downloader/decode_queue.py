"""The decode queue: decodes start real-time first, never behind a FIFO of bulk.

Fetching is I/O and runs many at a time; decoding is CPU and runs on a small
thread pool. Handing every fetched body straight to the pool made its internal
FIFO the real queue: a real-time item fetched after 60 bulk items waited for
all of them (p50 1.3-2.5 s at 64 in flight on 2 cores). Here the pool is only
ever given as many decodes as it has threads; the rest wait in a heap ordered
by lane priority (LANES order), then by arrival, and the next free thread takes
the head. A real-time item therefore waits for at most one decode per thread.

Once started, a real-time decode still shares the cores with the bulk decodes
running beside it (here and in the other processes of a node): on 2 cores a
thumbnail's decode took 121-154 ms at p95 next to 12 MP bulk ones. So bulk
decodes may run on their own threads at a lower OS priority (tagpipe_common.threads):
the kernel then gives a waiting real-time decode, the event loops and the model
the cores first, and the bulk decodes everything left over, which under bulk
load is nearly all of it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import TypeVar

from tagpipe_common.subjects import LANES, Lane

T = TypeVar("T")

_PRIORITY = {lane: rank for rank, lane in enumerate(LANES)}


class DecodeQueue:
    """Runs blocking calls on `pool` (or the lane's own in `lane_pools`), at most
    `slots` at once, highest lane first."""

    def __init__(
        self, pool: Executor, slots: int, lane_pools: Mapping[Lane, Executor] | None = None
    ) -> None:
        if slots < 1:
            raise ValueError("a decode queue needs at least one slot")
        self._pools = {lane: (lane_pools or {}).get(lane, pool) for lane in LANES}
        self._free = slots
        self._seq = itertools.count()
        # (lane rank, arrival, waiter); a cancelled waiter stays until popped.
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._queued = dict.fromkeys(LANES, 0)

    def queued(self, lane: Lane | None = None) -> int:
        """Decodes waiting for a thread (of one lane, or all)."""
        return self._queued[lane] if lane is not None else sum(self._queued.values())

    async def run(self, lane: Lane, fn: Callable[..., T], *args: object) -> T:
        await self._acquire(lane)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pools[lane], fn, *args)
        finally:
            self._release()

    async def _acquire(self, lane: Lane) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (_PRIORITY[lane], next(self._seq), waiter))
        self._queued[lane] += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over just as we were cancelled
            raise
        finally:
            self._queued[lane] -= 1

    def _release(self) -> None:
        while self._waiting:
            _, _, waiter = heapq.heappop(self._waiting)
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next waiter
                return
        self._free += 1
