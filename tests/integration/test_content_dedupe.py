"""Content-addressed dedupe through both tiers: a real download worker and a real
inference worker (the real model) on real NATS JetStream and Redis, fed by a
local image server that serves the same bytes under several URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from tagpipe_cli.servers import ServerProcess
from tagpipe_common import keys as K
from tagpipe_common.keys import RedisKeys
from tagpipe_common.manifest import ModelManifest
from tagpipe_common.messages import DownloadTask, TagResult, TaskOptions
from tagpipe_common.nats_io import connect_nats
from tagpipe_common.results import ResultStore
from tagpipe_common.streams import consumer_backlog
from tagpipe_common.subjects import Lane, Stage, stage_names
from tagpipe_downloader.fetch import Fetcher
from tagpipe_downloader.settings import DownloaderSettings
from tagpipe_downloader.worker import DownloadWorker
from tagpipe_inference.model import Model, load_model
from tagpipe_inference.settings import InferenceSettings
from tagpipe_inference.worker import InferenceWorker

from bench.imageserver import ImageServer, make_jpeg

pytestmark = pytest.mark.integration
DOWNLOAD = stage_names(Stage.DOWNLOAD)
KEYS = RedisKeys()


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Model:
    m = load_model(model_dir, intra_op_threads=2)
    m.warm_up(1)
    return m


@dataclass
class Pipe:
    js: JetStreamContext
    redis: Redis
    store: ResultStore
    images: ImageServer
    inference: InferenceWorker

    async def submit(self, url: str, job_id: str, item_id: str | None = None, **kw: Any) -> str:
        item_id = item_id or uuid.uuid4().hex
        task = DownloadTask(item_id=item_id, url=url, job_id=job_id, lane=Lane.BULK, **kw)
        await self.js.publish(DOWNLOAD.subject(Lane.BULK), task.to_json())
        return item_id

    async def result(self, item_id: str) -> TagResult:
        await until(lambda: self.store.get(item_id), timeout_s=60)
        r = await self.store.get(item_id)
        assert r is not None
        return r

    async def job(self, total: int) -> str:
        job_id = uuid.uuid4().hex
        await self.redis.hset(
            KEYS.job(job_id), mapping={K.JOB_TOTAL: total, K.JOB_STATE: "running"}
        )
        return job_id

    async def cache_keys(self) -> list[bytes]:
        return [k async for k in self.redis.scan_iter(match=f"{KEYS.prefix}:tagcache:*")]

    async def remembered(self, n: int = 1) -> None:
        """Inference writes the cache just after the result: wait for it, not a clock."""

        async def enough() -> bool:
            return len(await self.cache_keys()) >= n

        await until(enough)

    async def drained(self) -> None:
        """Every download message answered and acked (redeliveries included)."""

        async def idle() -> bool:
            return await consumer_backlog(self.js, Stage.DOWNLOAD, Lane.BULK, KEYS.prefix) == 0

        await until(idle)


Start = Callable[..., Awaitable[Pipe]]


async def until(cond: Callable[[], Awaitable[object]], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.fixture
async def start(
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    js: JetStreamContext,
    redis: Redis,
    store: ResultStore,
    model: Model,
    model_dir: Path,
) -> AsyncIterator[Start]:
    async with contextlib.AsyncExitStack() as stack:

        async def _start(inference: dict[str, Any] | None = None, **downloader: Any) -> Pipe:
            common = {"nats_url": nats_proc.url, "redis_url": redis_proc.url, "max_deliver": 3}
            fixed = {"allow_cidrs": "127.0.0.2/32", "decode_workers": 2, "health_port": 0}
            on = {"model_dir": model_dir, "content_dedupe": True}
            d = DownloaderSettings(**common, **fixed, **(on | downloader))
            i = InferenceSettings(
                **common, model_dir=model_dir, max_batch=4, health_port=0, **(inference or {})
            )
            images = await stack.enter_async_context(ImageServer(host="127.0.0.2"))
            nc = await connect_nats(d.nats_servers, "downloader-under-test")
            stack.push_async_callback(nc.close)
            wredis = Redis.from_url(d.redis_url)
            stack.push_async_callback(wredis.aclose)
            fetcher = await stack.enter_async_context(Fetcher(d.fetch_config()))
            pool = ThreadPoolExecutor(2)
            stack.callback(pool.shutdown, wait=False)
            down = DownloadWorker(d, nc, wredis, fetcher, pool)
            infer = InferenceWorker(i, model, js, store)
            await infer.subscribe()
            for w in (down, infer):
                task = asyncio.create_task(w.run())
                stack.push_async_callback(_stopped, w, task)
            return Pipe(js, redis, store, images, infer)

        yield _start


async def _stopped(worker: DownloadWorker | InferenceWorker, task: asyncio.Task[None]) -> None:
    worker.stop()
    await asyncio.wait_for(task, 30)


def cached_count() -> float:
    value = REGISTRY.get_sample_value(
        "tagpipe_downloader_items_total", {"lane": "bulk", "outcome": "cached"}
    )
    return value or 0.0


async def test_the_same_bytes_at_two_urls_are_inferred_once(start: Start) -> None:
    p = await start()
    photo = make_jpeg(640, 480, seed=7)
    first_url, second_url = p.images.add("a", photo), p.images.add("b", photo)
    job = await p.job(2)
    first = await p.result(await p.submit(first_url, job))
    await p.remembered()
    second = await p.result(await p.submit(second_url, job))
    assert first.status == second.status == "ok"
    assert p.inference.items == 1  # the second never reached the model
    assert (first.cached, second.cached) == (False, True)
    assert second.tags == first.tags and len(second.tags) == 5
    assert (second.model, second.model_version) == (first.model, first.model_version)
    assert second.source == second_url and second.job_id == job
    assert second.timings.inference_ms is None and second.timings.download_ms is not None
    assert await p.redis.hget(KEYS.job(job), K.JOB_DONE) == b"2"
    # Another item's options are answered from the same entry: fewer tags, a floor.
    floor = first.tags[1].score
    third = await p.result(
        await p.submit(second_url, job, options=TaskOptions(top_k=3, min_score=floor))
    )
    assert third.cached and third.tags == first.tags[:2]
    # More tags than the entry holds: a miss, so the model runs again.
    deeper = await p.result(await p.submit(second_url, job, options=TaskOptions(top_k=8)))
    assert not deeper.cached and len(deeper.tags) == 8 and p.inference.items == 2


async def test_a_downloader_for_another_model_version_gets_no_hit(
    start: Start, model_dir: Path, tmp_path: Path
) -> None:
    # A rollout: this downloader prepares for version 2; inference still runs 1.0.0.
    manifest = ModelManifest.load(model_dir)
    manifest.version = "2.0.0-next"
    manifest.save(tmp_path)
    p = await start(manifest_path=tmp_path / "manifest.json")
    photo = make_jpeg(640, 480, seed=8)
    job = await p.job(2)
    first = await p.result(await p.submit(p.images.add("a", photo), job))
    await p.remembered()  # the entry is there; the downloader must not read it
    second = await p.result(await p.submit(p.images.add("b", photo), job))
    assert not first.cached and not second.cached
    assert p.inference.items == 2
    assert second.model_version == "1.0.0"  # what actually tagged it, not what was asked
    assert all(b":1.0.0:" in k for k in await p.cache_keys())  # inference's own version


async def test_the_switch_off_means_no_hit_and_no_cache(start: Start) -> None:
    p = await start(content_dedupe=False)
    photo = make_jpeg(640, 480, seed=9)
    job = await p.job(2)
    first = await p.result(await p.submit(p.images.add("a", photo), job))
    second = await p.result(await p.submit(p.images.add("b", photo), job))
    assert not first.cached and not second.cached
    assert p.inference.items == 2
    assert await p.cache_keys() == []


async def test_an_expired_entry_is_a_miss(start: Start) -> None:
    p = await start(inference={"content_dedupe_ttl_s": 1})
    photo = make_jpeg(640, 480, seed=10)
    job = await p.job(2)
    first = await p.result(await p.submit(p.images.add("a", photo), job))
    assert not first.cached
    await p.remembered()

    async def expired() -> bool:
        return not await p.cache_keys()

    await until(expired)  # Redis expires the entry; wait on that, not a clock
    second = await p.result(await p.submit(p.images.add("b", photo), job))
    assert not second.cached and p.inference.items == 2


async def test_a_redelivered_hit_still_gives_exactly_one_result(start: Start) -> None:
    p = await start()
    photo = make_jpeg(640, 480, seed=11)
    job = await p.job(2)
    await p.result(await p.submit(p.images.add("a", photo), job))
    await p.remembered()
    second_url = p.images.add("b", photo)
    before = cached_count()
    # The same message three times, as JetStream redelivers one whose ack was lost:
    # every delivery is a cache hit and writes through SET NX.
    item_id = uuid.uuid4().hex
    for _ in range(3):
        await p.submit(second_url, job, item_id=item_id)
    hit = await p.result(item_id)
    assert hit.cached
    await p.drained()
    assert len(p.images.hits["/img/b"]) == 3  # each delivery fetched and looked up
    assert cached_count() - before == 1  # counted once, though answered three times
    assert await p.redis.xlen(KEYS.job_results(job)) == 2
    assert await p.redis.hget(KEYS.job(job), K.JOB_DONE) == b"2"
    assert p.inference.items == 1
