"""Partitions on a real nats-server and Redis, with the real model: the gateway's
publisher spreads items over 3 streams per stage by item id, every worker pulls
from all of them (real-time first), backlogs add up, and every item of a job ends
as exactly one result.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from redis.asyncio import Redis
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.fairpull import bind_lane
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import DownloadTask, InferenceTask
from tagpipe_common.nats_io import close_nats, connect_nats
from tagpipe_common.results import ResultStore
from tagpipe_common.streams import StreamPolicy, ensure_streams, stage_backlog, unread_partitions
from tagpipe_common.subjects import HDR_MSG_ID, Lane, Stage, partition_of
from tagpipe_downloader.fetch import Fetcher
from tagpipe_downloader.settings import DownloaderSettings
from tagpipe_downloader.worker import DownloadWorker
from tagpipe_gateway.queue import BacklogCache, Publisher
from tagpipe_inference.model import Model, load_model
from tagpipe_inference.settings import InferenceSettings
from tagpipe_inference.worker import InferenceWorker

from bench.imageserver import ImageServer, make_jpeg
from tests.tools import eventually

pytestmark = pytest.mark.integration

PARTS = 3


@pytest.fixture
def policy() -> StreamPolicy:
    # The conftest's `js` ensures the streams with this policy: 3 partitions per stage.
    return StreamPolicy(prefix="tagpipe", ack_wait_s=10.0, max_deliver=3, partitions=PARTS)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Model:
    return load_model(model_dir, intra_op_threads=1)


def ids_per_partition(per_partition: int) -> list[list[str]]:
    """Item ids grouped by the partition they hash to, `per_partition` of each."""
    out: list[list[str]] = [[] for _ in range(PARTS)]
    while min(len(ids) for ids in out) < per_partition:
        item_id = uuid.uuid4().hex
        if len(out[p := partition_of(item_id, PARTS)]) < per_partition:
            out[p].append(item_id)
    return out


async def publish_raw(js: JetStreamContext, policy: StreamPolicy, item_id: str, lane: Lane) -> None:
    """A message on the partition its id hashes to, as the publishers do."""
    names = policy.names(Stage.INFER)[partition_of(item_id, PARTS)]
    await js.publish(names.subject(lane), item_id.encode(), headers={HDR_MSG_ID: item_id})


def test_names_are_those_of_the_policy(policy: StreamPolicy) -> None:
    assert [n.stream for n in policy.names(Stage.DOWNLOAD)] == [
        "TAGPIPE_DOWNLOAD",
        "TAGPIPE_DOWNLOAD_P1",
        "TAGPIPE_DOWNLOAD_P2",
    ]


async def test_fair_pull_hands_out_every_partition_in_turn(
    js: JetStreamContext, policy: StreamPolicy
) -> None:
    groups = ids_per_partition(4)
    for ids in groups:
        for item_id in ids:
            await publish_raw(js, policy, item_id, Lane.BULK)
    pull = await bind_lane(js, policy.names(Stage.INFER), Lane.BULK)
    try:
        first = await pull.fetch(1, 5.0)
        [a] = [partition_of(m.data.decode(), PARTS) for m in first]
        # Let every partition's fetch land: from here the hand-out alone decides.
        if pull._inflight:
            await asyncio.wait(list(pull._inflight.values()), timeout=10.0)
        rest = await pull.fetch(6, 1.0)
        # What the other partitions brought comes next, before `a` takes a second turn.
        assert sorted(partition_of(m.data.decode(), PARTS) for m in rest) == sorted(
            set(range(PARTS)) - {a}
        )
        taken = first + rest
        while len(taken) < 12:
            taken += await pull.fetch(12, 2.0)
        assert sorted(m.data.decode() for m in taken) == sorted(i for ids in groups for i in ids)
        assert pull.taken == [4, 4, 4]
        for m in taken:
            await m.ack()
    finally:
        await pull.close()


async def test_an_idle_long_poll_ends_when_any_partition_gets_a_message(
    js: JetStreamContext, policy: StreamPolicy
) -> None:
    [_, _, (late,)] = ids_per_partition(1)
    pull = await bind_lane(js, policy.names(Stage.INFER), Lane.REALTIME)
    try:
        waiting = asyncio.create_task(pull.fetch(1, 20.0))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await publish_raw(js, policy, late, Lane.REALTIME)  # partition 2, polled alongside 0
        msgs = await asyncio.wait_for(waiting, 20.0)
        # Well inside the 20 s poll: the message was not left waiting for a turn.
        assert time.monotonic() - t0 < 10.0
        assert [m.data.decode() for m in msgs] == [late]
        await msgs[0].ack()
    finally:
        assert await pull.close() == 0


async def test_the_publisher_spreads_by_item_id_and_dedupes_within_a_partition(
    js: JetStreamContext, policy: StreamPolicy
) -> None:
    publisher = Publisher(js, "tagpipe", partitions=PARTS)
    tasks = [
        DownloadTask(item_id=uuid.uuid4().hex, job_id="job-s", lane=Lane.BULK, url="https://x/y")
        for _ in range(60)
    ]
    await publisher.publish_many(tasks)
    await publisher.publish_many(tasks[:10])  # a republish: the same Nats-Msg-Id, same stream
    stored = []
    for names in policy.names(Stage.DOWNLOAD):
        info = await js.stream_info(names.stream)
        stored.append(int(info.state.messages or 0))
    assert sum(stored) == 60 and min(stored) > 0
    expect = Counter(partition_of(t.item_id, PARTS) for t in tasks)
    assert stored == [expect[p] for p in range(PARTS)]
    # Backlog readers sum every partition: the operator's and the gateway's.
    assert await stage_backlog(js, Stage.DOWNLOAD, "tagpipe", PARTS) == 60
    assert await stage_backlog(js, Stage.DOWNLOAD, "tagpipe") == stored[0]
    cache = BacklogCache(js, "tagpipe", ttl_s=0.0, partitions=PARTS)
    assert await cache.get() == 60


async def test_streams_past_a_lowered_count_that_still_hold_work_are_named(
    js: JetStreamContext, policy: StreamPolicy
) -> None:
    [_, _, held] = ids_per_partition(2)
    for item_id in held:
        await publish_raw(js, policy, item_id, Lane.BULK)
    assert await unread_partitions(js, policy) == {}
    lowered = replace(policy, partitions=1)
    await ensure_streams(js, lowered)
    # The operator puts this in status.streams: no worker reads TAGPIPE_INFER_P2 now.
    assert await unread_partitions(js, lowered) == {"TAGPIPE_INFER_P2": 2}


async def test_the_realtime_pull_reaches_every_partition_with_bulk_queued(
    js: JetStreamContext,
    policy: StreamPolicy,
    store: ResultStore,
    model: Model,
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    model_dir: Path,
) -> None:
    bulk = [i for ids in ids_per_partition(3) for i in ids]
    realtime = [ids[0] for ids in ids_per_partition(1)]  # one on each partition
    for item_id in bulk:
        await publish(js, policy, item_id, Lane.BULK)
    for item_id in realtime:
        await publish(js, policy, item_id, Lane.REALTIME)
    settings = inference_settings(
        nats_proc, redis_proc, model_dir, max_batch=4, lane_peek_ms=250, top_up_ms=250
    )
    worker = InferenceWorker(settings, model, js, store)
    await worker.subscribe()
    collect = worker._collector
    try:
        # The real-time loop's own pull reaches every partition's real-time item,
        # bulk queued ahead of them in every partition; the bulk loop then gets the rest.
        got_rt: list[str] = []
        for _ in range(20):
            got_rt += [
                InferenceTask.from_wire(m.data).item_id
                for m in await ack_all(await collect.realtime_batch())
            ]
            if len(got_rt) >= len(realtime):
                break
        assert sorted(got_rt) == sorted(realtime)
        got_bulk: list[str] = []
        while len(got_bulk) < len(bulk):
            batch = await ack_all(await collect.bulk_batch())
            got_bulk += [InferenceTask.from_wire(m.data).item_id for m in batch]
        assert sorted(got_bulk) == sorted(bulk)
    finally:
        worker.stop()
        await collect.close()


async def ack_all(msgs: list[Msg]) -> list[Msg]:
    for m in msgs:
        await m.ack()
    return msgs


async def test_the_downloader_takes_realtime_first_across_partitions(
    js: JetStreamContext,
    store: ResultStore,
    model: Model,
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    model_dir: Path,
) -> None:
    url = "https://photos.example.com/x.jpg"
    bulk = [
        DownloadTask(item_id=i, job_id="job-b", lane=Lane.BULK, url=url)
        for ids in ids_per_partition(2)
        for i in ids
    ]
    realtime = [
        DownloadTask(item_id=ids[0], request_id="r", lane=Lane.REALTIME, url=url)
        for ids in ids_per_partition(1)
    ]
    publisher = Publisher(js, "tagpipe", partitions=PARTS)
    await publisher.publish_many(bulk)
    await publisher.publish_many(realtime)
    args = (nats_proc, redis_proc, model_dir, model, js, store)
    async with RunningWorkers(*args, run=False) as w:
        subs = await w.downloader._bind()
        assert subs is not None
        order: list[tuple[Lane, str]] = []
        while len(order) < len(bulk) + len(realtime):
            for msg, lane in await w.downloader._next_batch(subs, 4):
                order.append((lane, DownloadTask.from_json(msg.data).item_id))
                await msg.ack()
        for pull in subs.values():
            await pull.close()
    # The real-time item of every partition before any bulk item.
    first = order[: len(realtime)]
    assert {i for _, i in first} == {t.item_id for t in realtime}
    assert {lane for lane, _ in first} == {Lane.REALTIME}


def inference_settings(
    nats_proc: ServerProcess, redis_proc: ServerProcess, model_dir: Path, **kw: Any
) -> InferenceSettings:
    base: dict[str, Any] = {
        "nats_url": nats_proc.url,
        "redis_url": redis_proc.url,
        "model_dir": model_dir,
        "max_batch": 8,
        "max_deliver": 3,
        "health_port": 0,
        "intra_op_threads": 1,
        "partitions": PARTS,
    }
    return InferenceSettings(**(base | kw))


async def publish(js: JetStreamContext, policy: StreamPolicy, item_id: str, lane: Lane) -> None:
    pixels = np.random.default_rng(len(item_id)).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    owner: dict[str, Any] = {"job_id": "job-rt"} if lane is Lane.BULK else {"request_id": "r"}
    task = InferenceTask(
        item_id=item_id, lane=lane, shape=(224, 224, 3), pixels=pixels.tobytes(), **owner
    )
    names = policy.names(Stage.INFER)[partition_of(item_id, PARTS)]
    await js.publish(names.subject(lane), task.to_wire(), headers={HDR_MSG_ID: item_id})


@pytest.fixture
async def images() -> AsyncIterator[ImageServer]:
    srv = await ImageServer(host="127.0.0.2").__aenter__()
    yield srv
    await srv.__aexit__(None, None, None)


async def test_every_item_of_a_job_gets_exactly_one_result_across_partitions(
    js: JetStreamContext,
    policy: StreamPolicy,
    store: ResultStore,
    redis: Redis,
    model: Model,
    images: ImageServer,
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    model_dir: Path,
) -> None:
    job, keys = "job-parts", RedisKeys()
    urls = [images.add(f"p{i}.jpg", make_jpeg(96, 72, seed=i)) for i in range(24)]
    tasks = [
        DownloadTask(item_id=uuid.uuid4().hex, job_id=job, lane=Lane.BULK, url=u) for u in urls
    ]
    publisher = Publisher(js, "tagpipe", partitions=PARTS)
    await publisher.publish_many(tasks)
    await publisher.publish_many(tasks[:6])  # republished: deduped in its own partition
    async with RunningWorkers(nats_proc, redis_proc, model_dir, model, js, store):

        async def all_results() -> bool:
            got = await store.get_many([t.item_id for t in tasks])
            return all(r is not None for r in got)

        await eventually(all_results, within=180.0, every=0.2)

        async def drained() -> bool:
            return await stage_backlog(js, Stage.INFER, "tagpipe", PARTS) == 0

        await eventually(drained, within=60.0)
    results = await store.get_many([t.item_id for t in tasks])
    assert {r.status for r in results if r is not None} == {"ok"}, results
    # The job's result stream holds each item exactly once (the result script's append).
    entries = await redis.xrange(keys.job_results(job))
    seen = Counter(json.loads(fields[b"r"])["item_id"] for _, fields in entries)
    assert seen == Counter({t.item_id: 1 for t in tasks})
    done = await redis.hget(keys.job(job), "done")  # type: ignore[misc]
    assert done == str(len(tasks)).encode()
    # Both stages' every partition carried items, and every one was consumed.
    expect = Counter(partition_of(t.item_id, PARTS) for t in tasks)
    assert min(expect.values()) > 0  # 24 ids over 3 partitions: each gets some
    for stage in Stage:
        for p, names in enumerate(policy.names(stage)):
            info = await js.stream_info(names.stream)
            assert int(info.state.last_seq or 0) == expect[p], (names.stream, info.state)
            assert int(info.state.messages or 0) == 0, names.stream


class RunningWorkers:
    """A downloader and an inference worker in this process, both on 3 partitions."""

    def __init__(
        self,
        nats_proc: ServerProcess,
        redis_proc: ServerProcess,
        model_dir: Path,
        model: Model,
        js: JetStreamContext,
        store: ResultStore,
        run: bool = True,  # False: built, not running (a test drives them)
    ) -> None:
        self.args = (nats_proc, redis_proc, model_dir, model, js, store)
        self.run = run
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> RunningWorkers:
        nats_proc, redis_proc, model_dir, model, js, store = self.args
        ds = DownloaderSettings(
            nats_url=nats_proc.url,
            redis_url=redis_proc.url,
            allow_cidrs="127.0.0.2/32",
            max_deliver=3,
            decode_workers=1,
            health_port=0,
            partitions=PARTS,
        )
        self.nc = await connect_nats(ds.nats_servers, "downloader-under-test")
        self.redis = Redis.from_url(ds.redis_url)
        self.fetcher = await Fetcher(ds.fetch_config()).__aenter__()
        self.pool = ThreadPoolExecutor(1)
        self.downloader = DownloadWorker(ds, self.nc, self.redis, self.fetcher, self.pool)
        inf = inference_settings(nats_proc, redis_proc, model_dir)
        self.inference = InferenceWorker(inf, model, js, store)
        if not self.run:
            return self
        await self.inference.subscribe()
        self.tasks = [
            asyncio.create_task(self.downloader.run()),
            asyncio.create_task(self.inference.run()),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.downloader.stop()
        self.inference.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 60)
        await self.fetcher.__aexit__(None, None, None)
        await close_nats(self.nc)
        await self.redis.aclose()
        self.pool.shutdown(wait=False)
