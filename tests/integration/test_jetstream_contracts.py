"""The JetStream and Redis behaviours every worker relies on, against real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from redis.asyncio import Redis
from tagpipe_common.errors import ErrorCode
from tagpipe_common.messages import DownloadTask, TagResult
from tagpipe_common.results import ResultStore
from tagpipe_common.streams import (
    StreamPolicy,
    consumer_backlog,
    delete_streams,
    ensure_streams,
    give_back_buffered,
    is_final_delivery,
    pipeline_backlog,
    stage_backlog,
    stage_counters,
)
from tagpipe_common.subjects import HDR_MSG_ID, Lane, Stage, stage_names

DL = stage_names(Stage.DOWNLOAD)


def task(item_id: str) -> DownloadTask:
    return DownloadTask(item_id=item_id, job_id="job-1", lane=Lane.BULK, url="http://x/y.jpg")


async def bind(js: JetStreamContext, lane: Lane) -> JetStreamContext.PullSubscription:
    return await js.pull_subscribe_bind(DL.consumer(lane), DL.stream)


async def test_round_trip_publish_fetch_ack(js: JetStreamContext) -> None:
    ack = await js.publish(DL.subject(Lane.BULK), task("a").to_json())
    assert ack.stream == DL.stream
    sub = await bind(js, Lane.BULK)
    [msg] = await sub.fetch(1, timeout=2)
    assert DownloadTask.from_json(msg.data).item_id == "a"
    await msg.ack_sync()
    # WorkQueue retention: the acked message is gone from the stream.
    info = await js.stream_info(DL.stream)
    assert info.state.messages == 0


async def test_lanes_are_separate_consumers(js: JetStreamContext) -> None:
    await js.publish(DL.subject(Lane.REALTIME), task("rt").to_json())
    await js.publish(DL.subject(Lane.BULK), task("bk").to_json())
    assert await consumer_backlog(js, Stage.DOWNLOAD, Lane.REALTIME, "tagpipe") == 1
    assert await stage_backlog(js, Stage.DOWNLOAD, "tagpipe") == 2
    await js.publish(stage_names(Stage.INFER).subject(Lane.BULK), b"frame")
    assert await stage_backlog(js, Stage.INFER, "tagpipe") == 1
    assert await pipeline_backlog(js, "tagpipe") == 3
    [msg] = await (await bind(js, Lane.REALTIME)).fetch(1, timeout=2)
    assert DownloadTask.from_json(msg.data).item_id == "rt"


async def test_nak_with_delay_redelivers_after_the_delay(js: JetStreamContext) -> None:
    await js.publish(DL.subject(Lane.BULK), task("n").to_json())
    sub = await bind(js, Lane.BULK)
    [msg] = await sub.fetch(1, timeout=2)
    naked_at = time.monotonic()
    await msg.nak(delay=0.6)
    with pytest.raises(asyncio.TimeoutError):
        await sub.fetch(1, timeout=0.3)
    [again] = await sub.fetch(1, timeout=3)
    assert time.monotonic() - naked_at >= 0.5
    assert again.metadata.num_delivered == 2
    await again.ack_sync()


async def test_msg_id_dedupes_inside_the_window(js: JetStreamContext) -> None:
    headers = {HDR_MSG_ID: "item-42"}
    first = await js.publish(DL.subject(Lane.BULK), task("item-42").to_json(), headers=headers)
    second = await js.publish(DL.subject(Lane.BULK), task("item-42").to_json(), headers=headers)
    assert not first.duplicate
    assert second.duplicate
    assert (await js.stream_info(DL.stream)).state.messages == 1


async def test_final_delivery_becomes_an_error_result(
    js: JetStreamContext, store: ResultStore, redis: Redis, policy: StreamPolicy
) -> None:
    """A worker that keeps failing turns the last attempt into a result, never limbo."""
    await redis.hset("tagpipe:job:job-1", mapping={"total": 1, "state": "running"})
    await js.publish(DL.subject(Lane.BULK), task("doomed").to_json())
    sub = await bind(js, Lane.BULK)
    attempts = 0
    while True:
        [msg] = await sub.fetch(1, timeout=5)
        attempts += 1
        if not is_final_delivery(msg, policy.max_deliver):
            await msg.nak(delay=0.05)
            continue
        t = DownloadTask.from_json(msg.data)
        err = TagResult.error(t, ErrorCode.RETRIES_EXHAUSTED, f"failed {attempts} times")
        assert await store.record(err)
        await msg.ack_sync()
        break
    assert attempts == policy.max_deliver
    stored = await store.get("doomed")
    assert stored is not None and stored.code == "retries_exhausted"
    assert await redis.hget("tagpipe:job:job-1", "failed") == b"1"
    assert await redis.hget("tagpipe:job:job-1", "state") == b"completed"
    assert (await js.stream_info(DL.stream)).state.messages == 0


async def test_ensure_streams_is_idempotent_and_applies_policy(js: JetStreamContext) -> None:
    changed = StreamPolicy(prefix="tagpipe", ack_wait_s=7.0, max_deliver=9, max_ack_pending=77)
    await ensure_streams(js, changed)
    await ensure_streams(js, changed)
    names = stage_names(Stage.INFER)
    info = await js.consumer_info(names.stream, names.consumer(Lane.BULK))
    assert info.config.max_deliver == 9
    assert info.config.ack_wait == 7.0
    assert info.config.max_ack_pending == 77
    sinfo = await js.stream_info(names.stream)
    assert str(sinfo.config.retention) in {"workqueue", "RetentionPolicy.WORK_QUEUE"}
    assert str(sinfo.config.storage) in {"file", "StorageType.FILE"}
    assert sinfo.config.duplicate_window == 120.0


async def test_stage_counters_feed_the_rate_term(js: JetStreamContext) -> None:
    """5 published over both lanes, 3 delivered, 2 of those acked: what the operator's
    rate meter differences over a window (published and removed only ever grow)."""
    for i in range(3):
        await js.publish(DL.subject(Lane.BULK), task(f"b{i}").to_json())
    for i in range(2):
        await js.publish(DL.subject(Lane.REALTIME), task(f"r{i}").to_json())
    msgs = await (await bind(js, Lane.BULK)).fetch(3, timeout=2)
    for msg in msgs[:2]:
        await msg.ack_sync()
    c = await stage_counters(js, Stage.DOWNLOAD, "tagpipe")
    assert (c.published, c.removed, c.pending, c.ack_pending) == (5, 2, 2, 1)
    await msgs[2].ack_sync()
    later = await stage_counters(js, Stage.DOWNLOAD, "tagpipe")
    assert (later.published, later.removed, later.ack_pending) == (5, 3, 0)


async def test_missing_consumer_raises_rather_than_guessing(js: JetStreamContext) -> None:
    deleted = await delete_streams(js, "tagpipe")
    assert deleted == ["TAGPIPE_DOWNLOAD", "TAGPIPE_INFER", "TAGPIPE_ADVISORIES"]
    with pytest.raises(NotFoundError):
        await stage_backlog(js, Stage.DOWNLOAD, "tagpipe")
    with pytest.raises(NotFoundError):
        await stage_counters(js, Stage.DOWNLOAD, "tagpipe")


async def test_result_write_read_and_ttl(store: ResultStore, redis: Redis) -> None:
    ok = TagResult(item_id="r1", request_id="req", status="ok", tags=[], model="m")
    assert await store.record(ok)
    got = await store.get("r1")
    assert got is not None and got.status == "ok" and got.request_id == "req"
    ttl = await redis.ttl(store.keys.result("r1"))
    assert 0 < ttl <= store.ttl_s


async def test_second_result_for_an_item_is_refused(store: ResultStore, redis: Redis) -> None:
    await redis.hset("tagpipe:job:j2", mapping={"total": 5, "state": "running"})
    first = TagResult(item_id="dup", job_id="j2", status="ok", model="m")
    other = TagResult.error(first, "decode_error", "late duplicate")
    assert await store.record_many([first, other]) == [True, False]
    stored = await store.get("dup")
    assert stored is not None and stored.status == "ok"
    assert await redis.hget("tagpipe:job:j2", "done") == b"1"
    assert await redis.hget("tagpipe:job:j2", "failed") is None
    assert await redis.xlen("tagpipe:job:j2:results") == 1


async def test_a_stopping_worker_gives_back_what_its_subscription_buffered(
    js: JetStreamContext, nc: Client
) -> None:
    """Messages delivered for a pull that had already timed out sit in nats.py's
    queue; unsubscribing would drop them unacked until their ack wait ran out."""
    for i in range(10):
        await js.publish(DL.subject(Lane.BULK), task(f"b{i}").to_json())
    sub = await bind(js, Lane.BULK)
    # The pull request nats.py sends for a fetch, whose answer nobody then reads.
    await nc.publish(sub._nms, b'{"batch": 10, "no_wait": true}', sub._deliver)
    await _until(lambda: _ack_pending(js), 10)  # held by a subscription about to go
    assert sub.pending_msgs == 10
    assert await give_back_buffered(sub) == 10
    # Redelivered at once, not after the 60 s ack wait they would sit out if dropped.
    again = await (await bind(js, Lane.BULK)).fetch(10, timeout=5)
    assert len(again) == 10 and {m.metadata.num_delivered for m in again} == {2}


async def _ack_pending(js: JetStreamContext) -> int:
    return int((await js.consumer_info(DL.stream, DL.consumer(Lane.BULK))).num_ack_pending or 0)


async def _until(read: Callable[[], Awaitable[int]], want: int) -> None:
    async with asyncio.timeout(10):
        while (await read()) != want:  # noqa: ASYNC110 (a server-side count, no event to await)
            await asyncio.sleep(0.05)
