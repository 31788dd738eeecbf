"""Stranded items (stranded.py, advisories.py) against real NATS JetStream and Redis.

A consumer that takes a message on every delivery and never acks stands in for a
worker that dies with it each time: after max_deliver deliveries JetStream gives
up, its MAX_DELIVERIES advisory lands in the advisory stream, and the stage's
sweeper turns it into one retries_exhausted result and removes the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from tagpipe_common.advisories import (
    MaxDeliveries,
    advisory_consumer,
    advisory_stream,
    ensure_advisories,
)
from tagpipe_common.messages import DownloadTask, InferenceTask, Tag, TagResult
from tagpipe_common.results import ResultStore
from tagpipe_common.stranded import StrandedSweeper, loose_ref
from tagpipe_common.streams import StreamPolicy, ensure_streams
from tagpipe_common.subjects import Lane, Stage, partition_names, stage_names

from tests.tools import eventually

pytestmark = pytest.mark.integration

DL = stage_names(Stage.DOWNLOAD)
INF = stage_names(Stage.INFER)


@pytest.fixture
def policy() -> StreamPolicy:
    # Short leases, few deliveries: an item strands within seconds.
    return StreamPolicy(
        prefix="tagpipe", ack_wait_s=1.0, max_deliver=2, ack_wait_overrides={Stage.DOWNLOAD: 1.0}
    )


@pytest.fixture
async def sweepers(
    js: JetStreamContext, store: ResultStore, policy: StreamPolicy
) -> AsyncIterator[dict[Stage, StrandedSweeper]]:
    await ensure_advisories(js, policy)  # idempotent: ensure_streams may have made it
    out = {s: StrandedSweeper(js, store, s, policy.prefix, poll_s=0.2) for s in Stage}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in out.values()]
    yield out
    stop.set()
    await asyncio.gather(*tasks)


async def never_ack(js: JetStreamContext, stream: str, durable: str) -> None:
    """Take every delivery and drop it, as a worker killed with each one would."""
    sub = await js.pull_subscribe_bind(durable, stream=stream)
    while True:  # pulls must keep coming: JetStream gives up on a message at a pull
        with contextlib.suppress(TimeoutError):
            await sub.fetch(1, timeout=0.5)


@contextlib.asynccontextmanager
async def dying_worker(js: JetStreamContext, stream: str, durable: str) -> AsyncIterator[None]:
    task = asyncio.create_task(never_ack(js, stream, durable))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def settled_count(outcome: str) -> float:
    labels = {"stage": "download", "outcome": outcome}
    return REGISTRY.get_sample_value("tagpipe_stranded_items_total", labels) or 0.0


async def job(redis: Redis, job_id: str, total: int) -> None:
    await redis.hset(f"tagpipe:job:{job_id}", mapping={"total": total, "state": "running"})


async def test_a_download_whose_last_delivery_dies_ends_as_one_result(
    js: JetStreamContext,
    store: ResultStore,
    redis: Redis,
    sweepers: dict[Stage, StrandedSweeper],
) -> None:
    await job(redis, "job-s", 1)
    task = DownloadTask(item_id="poison", job_id="job-s", seq=7, lane=Lane.BULK, url="http://x/p")
    await js.publish(DL.subject(Lane.BULK), task.to_json())
    async with dying_worker(js, DL.stream, DL.consumer(Lane.BULK)):
        result = await eventually(lambda: store.get("poison"), within=60)
    assert result.status == "error" and result.code == "retries_exhausted"
    assert (result.job_id, result.seq, result.source) == ("job-s", 7, "http://x/p")
    assert "2 of 2" in (result.message or "")
    assert await redis.hget("tagpipe:job:job-s", "state") == b"completed"
    assert await redis.hget("tagpipe:job:job-s", "failed") == b"1"
    assert await redis.xlen("tagpipe:job:job-s:results") == 1
    # Gone from the work stream: it can never come back.
    await eventually(lambda: stream_empty(js, DL.stream))
    assert sweepers[Stage.DOWNLOAD].settled == 1


async def stream_empty(js: JetStreamContext, stream: str) -> bool:
    return (await js.stream_info(stream)).state.messages == 0


async def test_an_inference_frame_is_settled_by_the_inference_sweeper(
    js: JetStreamContext,
    store: ResultStore,
    redis: Redis,
    sweepers: dict[Stage, StrandedSweeper],
) -> None:
    await job(redis, "job-i", 1)
    frame = InferenceTask(
        item_id="heavy", job_id="job-i", lane=Lane.BULK, shape=(2, 2, 3), source="http://x/h"
    )
    frame.pixels = bytes(12)
    await js.publish(INF.subject(Lane.BULK), frame.to_wire())
    async with dying_worker(js, INF.stream, INF.consumer(Lane.BULK)):
        result = await eventually(lambda: store.get("heavy"), within=60)
    assert result.code == "retries_exhausted" and result.source == "http://x/h"
    assert await redis.hget("tagpipe:job:job-i", "state") == b"completed"
    await eventually(lambda: stream_empty(js, INF.stream))
    assert sweepers[Stage.INFER].settled == 1
    assert sweepers[Stage.DOWNLOAD].settled == 0


async def test_an_advisory_handled_twice_leaves_one_result(
    js: JetStreamContext, store: ResultStore, redis: Redis, policy: StreamPolicy
) -> None:
    """Two sweepers on one advisory (a redelivery after a sweeper died mid-way), and
    a final delivery that did succeed: SET NX keeps the first result, nothing counts twice."""
    await ensure_advisories(js, policy)
    await job(redis, "job-t", 1)
    task = DownloadTask(item_id="twice", job_id="job-t", lane=Lane.BULK, url="http://x/t")
    ack = await js.publish(DL.subject(Lane.BULK), task.to_json())
    advisory = MaxDeliveries(DL.stream, DL.consumer(Lane.BULK), ack.seq, 2)
    a = StrandedSweeper(js, store, Stage.DOWNLOAD, "tagpipe")
    b = StrandedSweeper(js, store, Stage.DOWNLOAD, "tagpipe")
    gone_before = settled_count("gone")
    assert await a.settle(advisory) == "recorded"
    assert await b.settle(advisory) == "gone"  # deleted by the first
    assert settled_count("gone") == gone_before + 1
    assert await redis.xlen("tagpipe:job:job-t:results") == 1
    # A message whose item already has a result (its final delivery succeeded, its
    # ack was lost): no second result, and the message still goes.
    ack = await js.publish(DL.subject(Lane.BULK), task.to_json())
    again = replace(advisory, stream_seq=ack.seq)
    assert await a.settle(again) == "duplicate"
    assert await redis.hget("tagpipe:job:job-t", "failed") == b"1"
    with pytest.raises(NotFoundError):
        await js.get_msg(DL.stream, ack.seq)


async def test_an_undecodable_message_is_deleted_with_a_result_where_it_can_be(
    js: JetStreamContext, store: ResultStore, redis: Redis, policy: StreamPolicy
) -> None:
    await ensure_advisories(js, policy)
    sweeper = StrandedSweeper(js, store, Stage.DOWNLOAD, "tagpipe")
    # An item id and owner, but no url: not a DownloadTask, still an item.
    half = json.dumps({"item_id": "half", "job_id": "job-u", "v": 99}).encode()
    junk = b"\x00not json at all"
    for body in (half, junk):
        ack = await js.publish(DL.subject(Lane.BULK), body)
        advisory = MaxDeliveries(DL.stream, DL.consumer(Lane.BULK), ack.seq, 2)
        assert await sweeper.settle(advisory) == "undecodable"
        with pytest.raises(NotFoundError):
            await js.get_msg(DL.stream, ack.seq)
    result = await store.get("half")
    assert result is not None and result.code == "retries_exhausted"
    assert loose_ref(junk) is None


async def test_advisory_stream_covers_every_partition_and_is_idempotent(
    js: JetStreamContext, policy: StreamPolicy
) -> None:
    await ensure_advisories(js, policy)
    await ensure_advisories(js, policy)
    info = await js.stream_info(advisory_stream("tagpipe"))
    subjects = info.config.subjects or []
    assert "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.TAGPIPE_DOWNLOAD.*" in subjects
    assert "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.TAGPIPE_INFER_P3.*" in subjects
    c = await js.consumer_info(info.config.name or "", advisory_consumer("tagpipe", Stage.INFER))
    assert all(".TAGPIPE_INFER" in s for s in c.config.filter_subjects or [])
    # Another pipeline on the same NATS gets its own stream, no overlap.
    await ensure_advisories(js, replace(policy, prefix="other"))


async def test_a_stranded_item_of_another_partition_is_settled_too(
    js: JetStreamContext,
    store: ResultStore,
    redis: Redis,
    policy: StreamPolicy,
    sweepers: dict[Stage, StrandedSweeper],
) -> None:
    await ensure_streams(js, replace(policy, partitions=2))
    p1 = partition_names(Stage.DOWNLOAD, "tagpipe", 2)[1]
    await job(redis, "job-p", 1)
    task = DownloadTask(item_id="p1-item", job_id="job-p", lane=Lane.BULK, url="http://x/p1")
    await js.publish(p1.subject(Lane.BULK), task.to_json())
    async with dying_worker(js, p1.stream, p1.consumer(Lane.BULK)):
        result = await eventually(lambda: store.get("p1-item"), within=60)
    assert result.code == "retries_exhausted"
    await eventually(lambda: stream_empty(js, p1.stream))


async def test_an_item_of_a_cancelled_job_gets_no_result(
    js: JetStreamContext, store: ResultStore, redis: Redis, policy: StreamPolicy
) -> None:
    await ensure_advisories(js, policy)
    await redis.hset("tagpipe:job:job-c", mapping={"total": 1, "state": "cancelled"})
    task = DownloadTask(item_id="dropped", job_id="job-c", lane=Lane.BULK, url="http://x/c")
    ack = await js.publish(DL.subject(Lane.BULK), task.to_json())
    advisory = MaxDeliveries(DL.stream, DL.consumer(Lane.BULK), ack.seq, 2)
    sweeper = StrandedSweeper(js, store, Stage.DOWNLOAD, "tagpipe")
    assert await sweeper.settle(advisory) == "cancelled"
    assert await store.get("dropped") is None
    assert await stream_empty(js, DL.stream)


SLOW = StreamPolicy(
    prefix="tagpipe", ack_wait_s=4.0, max_deliver=2, ack_wait_overrides={Stage.DOWNLOAD: 4.0}
)


async def advisories_stored(js: JetStreamContext) -> bool:
    return (await js.stream_info(advisory_stream("tagpipe"))).state.messages > 0


async def slow_last_delivery(js: JetStreamContext, store: ResultStore) -> None:
    """Drop the first delivery (a worker killed on it); hold the last one past its ack
    wait (a stalled worker, not a dead one: the advisory comes), then finish it as a
    worker does, its result first, then the ack. Pulls go on meanwhile, as the other
    workers' would: JetStream gives up on a message at a pull."""
    sub = await js.pull_subscribe_bind(DL.consumer(Lane.BULK), stream=DL.stream)
    held = None
    while held is None:
        with contextlib.suppress(TimeoutError):
            for msg in await sub.fetch(1, timeout=0.5):
                if msg.metadata.num_delivered >= 2:
                    held = msg
    while not await advisories_stored(js):
        with contextlib.suppress(TimeoutError):
            await sub.fetch(1, timeout=0.5)
    await asyncio.sleep(1.0)  # a sweeper polls every 0.2 s: without a grace it is done
    task = DownloadTask.from_json(held.data)
    ok = TagResult(**task.ref(), status="ok", tags=[Tag(label="cat", score=0.9)])
    await store.record(ok)
    await held.ack()


@pytest.mark.parametrize("policy", [SLOW])
async def test_a_last_delivery_that_is_slow_not_dead_keeps_its_own_result(
    js: JetStreamContext,
    store: ResultStore,
    redis: Redis,
    sweepers: dict[Stage, StrandedSweeper],
) -> None:
    await job(redis, "job-w", 1)
    task = DownloadTask(item_id="slow", job_id="job-w", lane=Lane.BULK, url="http://x/w")
    await js.publish(DL.subject(Lane.BULK), task.to_json())
    await asyncio.wait_for(slow_last_delivery(js, store), 60)
    await eventually(lambda: stream_empty(js, DL.stream), within=60)
    await asyncio.sleep(SLOW.ack_wait_s + 1)  # past the grace: the sweeper has looked
    result = await store.get("slow")
    assert result is not None and result.status == "ok", result
    assert await redis.hget("tagpipe:job:job-w", "failed") is None  # type: ignore[misc]
    assert sweepers[Stage.DOWNLOAD].settled == 0
