"""The decode queue: real-time decodes jump queued bulk ones; slots never leak."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from tagpipe_common.subjects import Lane
from tagpipe_common.threads import niced_pool
from tagpipe_downloader.decode_queue import DecodeQueue


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as p:
        yield p


async def _until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):  # a hang guard on a loaded runner, no speed claim
        while not cond():  # noqa: ASYNC110 (polls a counter the queue keeps)
            await asyncio.sleep(0.005)


async def test_realtime_runs_before_bulk_queued_earlier(pool: ThreadPoolExecutor) -> None:
    q = DecodeQueue(pool, slots=1)
    gate, started = threading.Event(), threading.Event()
    order: list[str] = []

    def work(name: str) -> str:
        if name == "first":
            started.set()
            gate.wait(30)
        order.append(name)
        return name

    first = asyncio.create_task(q.run(Lane.BULK, work, "first"))
    await _until(started.is_set)  # `first` holds the only slot
    bulk = [asyncio.create_task(q.run(Lane.BULK, work, f"bulk{i}")) for i in range(3)]
    await _until(lambda: q.queued(Lane.BULK) == 3)
    rt = asyncio.create_task(q.run(Lane.REALTIME, work, "rt"))
    await _until(lambda: q.queued(Lane.REALTIME) == 1)
    gate.set()
    assert await asyncio.gather(first, *bulk, rt) == ["first", "bulk0", "bulk1", "bulk2", "rt"]
    assert order == ["first", "rt", "bulk0", "bulk1", "bulk2"]
    assert q.queued() == 0


async def test_never_more_running_than_slots(pool: ThreadPoolExecutor) -> None:
    q = DecodeQueue(pool, slots=2)
    lock = threading.Lock()
    running, peak = 0, 0

    both = threading.Barrier(2, timeout=30)

    def work(i: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        if i < 2:
            both.wait()  # the first two (they get the free slots) overlap, however slow the box
        threading.Event().wait(0.01)
        with lock:
            running -= 1

    lanes = [Lane.BULK, Lane.REALTIME] * 10
    await asyncio.gather(*(q.run(lane, work, i) for i, lane in enumerate(lanes)))
    assert peak == 2


async def test_a_cancelled_waiter_does_not_leak_its_slot(pool: ThreadPoolExecutor) -> None:
    q = DecodeQueue(pool, slots=1)
    gate, started = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(30)

    holder = asyncio.create_task(q.run(Lane.BULK, hold))
    await _until(started.is_set)  # the holder has the only slot
    waiter = asyncio.create_task(q.run(Lane.REALTIME, lambda: "never"))
    await _until(lambda: q.queued() == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert q.queued() == 0
    gate.set()
    assert await holder is True
    # The slot came back: two more runs go through one after the other.
    assert await q.run(Lane.BULK, lambda: 1) == 1
    assert await q.run(Lane.REALTIME, lambda: 2) == 2


def test_needs_a_slot(pool: ThreadPoolExecutor) -> None:
    with pytest.raises(ValueError):
        DecodeQueue(pool, slots=0)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
async def test_bulk_decodes_run_on_nicer_threads_and_real_time_ones_do_not(
    pool: ThreadPoolExecutor,
) -> None:
    def nice_here() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = nice_here()
    with niced_pool(2, 10) as bulk_pool:
        q = DecodeQueue(pool, slots=2, lane_pools={Lane.BULK: bulk_pool})
        bulk, rt = await asyncio.gather(
            q.run(Lane.BULK, nice_here), q.run(Lane.REALTIME, nice_here)
        )
    assert bulk == min(base + 10, 19)
    assert rt == base  # the event loop's thread and the real-time decodes keep theirs
    assert nice_here() == base
    with niced_pool(1, 0) as same:
        assert same.submit(nice_here).result() == base
