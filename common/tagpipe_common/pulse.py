"""Each worker's pulse in Redis: the per-stage rates `tagpipe status` and `GET /v1/pipeline` show.

Every PERIOD_S a worker reads its own Prometheus counters (so no hot path changes for
this), keeps a minute of readings in memory and writes one small hash: images/s and the
mean batch size over the last minute, and items in flight. The hash expires after a few
periods, so a dead worker drops out of the count by itself, and a sorted set scored by
the last beat lists a stage's workers without a SCAN over the keyspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry
from redis.asyncio import Redis

from tagpipe_common.keys import RedisKeys
from tagpipe_common.outage import is_transient
from tagpipe_common.subjects import Stage

log = logging.getLogger(__name__)

PERIOD_S = 2.0
WINDOW_S = 60.0
TTL_S = 10  # five missed beats: the worker is gone


@dataclass(frozen=True)
class Reading:
    t: float
    images: float  # items this worker finished (any outcome)
    batches: float
    batch_images: float
    inflight: float


@dataclass(frozen=True)
class StageMetrics:
    """Which of a worker's Prometheus series make its pulse (sample names, not families)."""

    images: str
    inflight: str
    batch_count: str | None = None
    batch_sum: str | None = None


METRICS = {
    Stage.DOWNLOAD: StageMetrics(
        images="tagpipe_downloader_items_total", inflight="tagpipe_downloader_inflight"
    ),
    Stage.INFER: StageMetrics(
        images="tagpipe_inference_results_total",
        inflight="tagpipe_inference_inflight_items",
        batch_count="tagpipe_inference_batch_size_count",
        batch_sum="tagpipe_inference_batch_size_sum",
    ),
}


def registry_reader(stage: Stage, registry: CollectorRegistry = REGISTRY) -> Callable[[], Reading]:
    names = METRICS[stage]

    def read() -> Reading:
        totals: dict[str, float] = {}
        for family in registry.collect():
            for sample in family.samples:  # labelled series are summed over their labels
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        batch = (totals.get(names.batch_count or "", 0.0), totals.get(names.batch_sum or "", 0.0))
        return Reading(
            time.time(), totals.get(names.images, 0.0), *batch, totals.get(names.inflight, 0.0)
        )

    return read


class Pulse:
    def __init__(
        self, redis: Redis, keys: RedisKeys, stage: Stage, read: Callable[[], Reading]
    ) -> None:
        self.redis, self.keys, self.stage, self.read = redis, keys, stage, read
        self.worker = f"{socket.gethostname()}-{os.getpid()}"
        self.history: deque[Reading] = deque()

    def fields(self) -> dict[str, str]:
        now = self.read()
        self.history.append(now)
        while self.history and now.t - self.history[0].t > WINDOW_S:
            self.history.popleft()
        first = self.history[0]
        span = now.t - first.t
        rate = (now.images - first.images) / span if span > 0 else 0.0
        batches = now.batches - first.batches
        batch = (now.batch_images - first.batch_images) / batches if batches > 0 else 0.0
        return {
            "images_per_s": f"{rate:.3f}",
            "batches": f"{batches:.0f}",
            "batch_size": f"{batch:.3f}",
            "inflight": f"{now.inflight:.0f}",
            "updated_at": f"{now.t:.3f}",
        }

    async def beat(self) -> None:
        key = self.keys.pulse(self.stage.value, self.worker)
        index = self.keys.pulse_index(self.stage.value)
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=self.fields())
            pipe.expire(key, TTL_S)
            pipe.zadd(index, {self.worker: now})
            pipe.zremrangebyscore(index, "-inf", now - TTL_S)
            await pipe.execute()

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception as exc:  # a view only: never let it stop a worker
                if not is_transient(exc):
                    log.warning("pulse write failed", exc_info=True)
            await asyncio.sleep(PERIOD_S)


@contextlib.asynccontextmanager
async def beating(redis: Redis, prefix: str, stage: Stage) -> AsyncIterator[Pulse]:
    """Beat for the body's duration (a worker's run())."""
    pulse = Pulse(redis, RedisKeys(prefix), stage, registry_reader(stage))
    task = asyncio.create_task(pulse.run(), name=f"pulse-{stage.value}")
    try:
        yield pulse
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def stage_pulses(redis: Redis, keys: RedisKeys, stage: Stage) -> list[dict[str, str]]:
    """The live workers' last pulses (a worker whose hash expired is left out)."""
    index = keys.pulse_index(stage.value)
    workers = await redis.zrangebyscore(index, time.time() - TTL_S, "+inf")
    async with redis.pipeline(transaction=False) as pipe:
        for w in workers:
            pipe.hgetall(keys.pulse(stage.value, w.decode() if isinstance(w, bytes) else w))
        hashes = await pipe.execute()
    return [
        {k.decode(): v.decode() for k, v in h.items()}
        if h and isinstance(next(iter(h)), bytes)
        else h
        for h in hashes
        if h
    ]
