"""Load generators shared by the benchmark: closed-loop bulk and open-loop real-time.

Bulk is closed-loop (a fixed number of requests in flight, the way a batch
client drives a synchronous API). Real-time is open-loop at a fixed rate, so a
slow server cannot slow the arrivals down and hide its own latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

Call = Callable[[str], Awaitable[bool]]  # url -> ok?


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentiles(self) -> dict[str, float | None]:
        if not self.latencies_s:
            return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
        p = np.percentile(np.asarray(self.latencies_s) * 1000, [50, 95, 99])
        return {
            "p50_ms": round(float(p[0]), 1),
            "p95_ms": round(float(p[1]), 1),
            "p99_ms": round(float(p[2]), 1),
        }

    def summary(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
            **self.percentiles(),
        }


async def _timed(call: Call, url: str, res: LoadResult) -> None:
    t0 = time.perf_counter()
    try:
        ok = await call(url)
    except Exception:  # the server's failure is a measurement, not a crash of the bench
        ok = False
    if ok:
        res.ok += 1
        res.latencies_s.append(time.perf_counter() - t0)
    else:
        res.failed += 1


async def closed_loop(call: Call, urls: list[str], concurrency: int) -> LoadResult:
    res = LoadResult()
    it = iter(urls)

    async def worker() -> None:
        for url in it:
            await _timed(call, url, res)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.seconds = time.perf_counter() - t0
    return res


async def open_loop(call: Call, urls: list[str], rate: float, stop: asyncio.Event) -> LoadResult:
    """One request every 1/rate s (urls cycled) until `stop`; waits for stragglers."""
    res = LoadResult()
    tasks: list[asyncio.Task[None]] = []
    t0 = time.perf_counter()
    i = 0
    while not stop.is_set():
        tasks.append(asyncio.create_task(_timed(call, urls[i % len(urls)], res)))
        i += 1
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    await asyncio.gather(*tasks)
    res.seconds = time.perf_counter() - t0
    return res
