"""Jobs with an output: the result store's staging (results.py) and the gateway's sink
(sink.py) against real Redis and a real S3-compatible store (moto server, auth on).

The test plays the workers by calling ResultStore.record_many as they do; the sink is
the gateway's own, run in-process.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from tagpipe_common import keys as K
from tagpipe_common.keys import RedisKeys
from tagpipe_common.output import encode_shard
from tagpipe_common.results import ResultStore
from tagpipe_gateway.settings import GatewaySettings
from tagpipe_gateway.sink import _FIELDS, OutputJob, Sink, _job

from tests.integration.output_kit import (
    BUCKET,
    all_lines,
    create_output_job,
    keys_left,
    read_manifest,
    result,
)
from tests.s3kit import moto_s3, s3_client
from tests.tools import eventually

__all__ = ["moto_s3"]  # the fixture, imported for pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def s3(moto_s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for k, v in moto_s3.items():
        monkeypatch.setenv(k, v)  # what put_bytes' boto3 chain reads
    client = s3_client(moto_s3)
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    return client


def sink_settings(redis: Redis) -> GatewaySettings:
    url = f"redis://127.0.0.1:{redis.connection_pool.connection_kwargs['port']}/0"
    return GatewaySettings(
        redis_url=url, ack_wait_s=0.5, max_deliver=2, lease_s=2, recover_interval_s=0.2
    )


@pytest.fixture
async def sink(redis: Redis) -> AsyncIterator[Sink]:
    s = Sink(redis, RedisKeys(), sink_settings(redis))
    s.start()
    yield s
    await s.close()


async def test_an_output_result_is_staged_once_and_keeps_no_per_item_key(
    redis: Redis, store: ResultStore
) -> None:
    keys = RedisKeys()
    await create_output_job(redis, keys, "j1", f"s3://{BUCKET}/j1/", shard_size=4, total=6)
    first = [result("j1", s) for s in range(4)]
    assert await store.record_many(first) == [True] * 4
    # Redelivered (a worker killed after the write, before the ack): refused, not counted.
    assert await store.record_many([result("j1", 2), result("j1", 0)]) == [False, False]
    job = await redis.hgetall(keys.job("j1"))  # type: ignore[misc]
    assert int(job[b"done"]) + int(job[b"failed"]) == 4
    assert job[b"state"] == b"running"  # the sink completes an output job, not the store
    assert await redis.hlen(keys.job_shard("j1", 0)) == 4  # type: ignore[misc]
    assert await redis.smembers(keys.job_ready("j1")) == {b"0"}  # type: ignore[misc]
    assert not await redis.exists(keys.result("j1-n0"), keys.job_results("j1"))
    # Staging expires with the job, whatever happens to the gateways.
    # (The job's first: both count down, so the one read later reads less.)
    job_ttl = await redis.pttl(keys.job("j1"))
    assert 0 < await redis.pttl(keys.job_shard("j1", 0)) <= job_ttl
    # Once the shard is written, a late repeat is still refused.
    await redis.hset(keys.job_shards("j1"), "0", "{}")  # type: ignore[misc]
    await redis.delete(keys.job_shard("j1", 0))
    assert await store.record(result("j1", 1)) is False
    assert not await redis.exists(keys.job_shard("j1", 0))


async def test_an_inline_jobs_result_stream_expires_with_the_job(
    redis: Redis, store: ResultStore
) -> None:
    """No gateway needs to follow the job: the store itself gives the stream the job's
    expiry (a gateway killed mid-job used to leave the stream without one)."""
    keys = RedisKeys()
    await redis.hset(keys.job("i1"), mapping={"total": 2, "state": "running"})  # type: ignore[misc]
    await redis.expire(keys.job("i1"), 5000)
    inline = result("i1", 0).model_copy(update={"seq": None})
    assert await store.record(inline)
    job_ttl, stream_ttl = await redis.pttl(keys.job("i1")), await redis.pttl(keys.job_results("i1"))
    assert 0 < stream_ttl <= job_ttl and job_ttl - stream_ttl < 2000
    assert await redis.exists(keys.result(inline.item_id))  # inline jobs keep their result keys


async def test_the_sink_writes_every_item_once_then_the_manifest_then_completes(
    redis: Redis, store: ResultStore, s3: Any, sink: Sink
) -> None:
    keys, n, size = RedisKeys(), 23, 5
    await create_output_job(redis, keys, "j2", f"s3://{BUCKET}/j2/", shard_size=size, total=None)
    order = list(range(n))
    random.Random(2).shuffle(order)
    for start in range(0, n, 4):
        await store.record_many([result("j2", s) for s in order[start : start + 4]])
        # Full shards go out while the job runs; the job cannot end before `total`.
    await eventually(lambda: redis.hlen(keys.job_shards("j2")), within=30)
    assert (await redis.hget(keys.job("j2"), K.JOB_STATE)) == b"running"  # type: ignore[misc]
    await redis.hset(keys.job("j2"), K.JOB_TOTAL, str(n))  # type: ignore[misc]  # the reader's EOF

    async def completed() -> bool:
        state = await redis.hget(keys.job("j2"), K.JOB_STATE)  # type: ignore[misc]
        return bool(state == b"completed")

    await eventually(completed, within=30)
    lines = all_lines(s3, "j2/")
    assert [x["seq"] for x in lines] == list(range(n))  # exactly one line per item, in order
    assert lines[1]["id"] == "c1" and lines[0]["id"] == "j2-n0"
    assert lines[3] == {"id": "c3", "item_id": "j2-n3", "seq": 3, "status": "error",
                        "url": "https://img.example/3.jpg", "code": "dns_error",
                        "message": "no host"}  # fmt: skip
    assert lines[0]["tags"][0] == {"label": "tabby", "score": 0.75, "class_id": 281}
    doc = read_manifest(s3, "j2/")
    assert doc["state"] == "completed" and doc["total"] == n and doc["lines"] == n
    assert [s["name"] for s in doc["shards"]] == [f"shard-{k:06d}.jsonl.gz" for k in range(5)]
    assert [s["lines"] for s in doc["shards"]] == [5, 5, 5, 5, 3]
    assert doc["error_codes"] == {"decode_error": 2, "dns_error": 3}  # seqs 5, 16; 3, 10, 17
    assert doc["counts"]["ok"] == sum(x["status"] == "ok" for x in lines)
    # What stays in Redis: the job hash and one record per shard, nothing per item.
    assert await keys_left(redis, "tagpipe") == [keys.job("j2"), keys.job_shards("j2")]


async def test_a_shard_is_the_same_bytes_whoever_writes_it_in_whatever_order(
    redis: Redis, s3: Any
) -> None:
    """Two runs of one job (under two prefixes) with results landing in different
    orders, and the object a killed sink wrote before recording it: same bytes."""
    settings, n, size = sink_settings(redis), 12, 5
    staged: dict[bytes, bytes] = {}
    for run, prefix in enumerate(["a", "b"]):
        keys = RedisKeys(prefix)
        store = ResultStore(redis, keys)
        await create_output_job(redis, keys, "j3", f"s3://{BUCKET}/{prefix}/", size, total=n)
        order = list(range(n))
        random.Random(run).shuffle(order)
        await store.record_many([result("j3", s) for s in order])
        if run == 0:
            staged = await redis.hgetall(keys.job_shard("j3", 0))  # type: ignore[misc]
        sink = Sink(redis, keys, settings)
        assert await sink.lease.acquire("j3")
        await sink.run_job("j3")
    objects = {}
    for prefix in ["a", "b"]:
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")["Contents"]
        objects[prefix] = {
            o["Key"].split("/", 1)[1]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for o in listed
        }
    assert objects["a"] == objects["b"] and len(objects["a"]) == 4  # 3 shards + manifest
    assert encode_shard(0, staged)[0] == objects["a"]["shard-000000.jsonl.gz"]


async def test_a_cancelled_output_job_writes_what_it_has_and_says_cancelled(
    redis: Redis, store: ResultStore, s3: Any, sink: Sink
) -> None:
    keys = RedisKeys()
    await create_output_job(redis, keys, "j4", f"s3://{BUCKET}/j4/", shard_size=4, total=10)
    await store.record_many([result("j4", s) for s in (0, 1, 2, 3, 5, 8)])
    # Cancel writes nothing per item (H4): the state and when.
    await redis.hset(keys.job("j4"), mapping={"state": "cancelled", "cancelled_at": time.time()})  # type: ignore[misc]

    async def ended() -> bool:
        return bool(await redis.hget(keys.job("j4"), K.JOB_MANIFEST_AT))  # type: ignore[misc]

    await eventually(ended, within=30)
    assert [x["seq"] for x in all_lines(s3, "j4/")] == [0, 1, 2, 3, 5, 8]
    doc = read_manifest(s3, "j4/")
    assert doc["state"] == "cancelled" and doc["lines"] == 6 and doc["counts"]["not_run"] == 4
    assert (await redis.hget(keys.job("j4"), K.JOB_STATE)) == b"cancelled"  # type: ignore[misc]
    # A line landing after the cancelled job's output is written is refused.
    assert await store.record(result("j4", 9)) is False  # its shard (8-11) went out partial
    assert await redis.hlen(keys.job_shards("j4")) == 3  # type: ignore[misc]


async def test_an_output_job_with_no_items_still_gets_its_manifest(
    redis: Redis, s3: Any, sink: Sink
) -> None:
    keys = RedisKeys()
    await create_output_job(redis, keys, "j5", f"s3://{BUCKET}/j5/", shard_size=4, total=0)
    await redis.sadd(keys.sinking_jobs, "j5")  # type: ignore[misc]  # as JobManager.create does

    async def completed() -> bool:
        state = await redis.hget(keys.job("j5"), K.JOB_STATE)  # type: ignore[misc]
        return bool(state == b"completed")

    await eventually(completed, within=30)
    doc = read_manifest(s3, "j5/")
    assert doc["shards"] == [] and doc["lines"] == 0 and doc["total"] == 0


async def manifest_written(redis: Redis, keys: RedisKeys, job_id: str) -> bool:
    return bool(await redis.hget(keys.job(job_id), K.JOB_MANIFEST_AT))  # type: ignore[misc]


async def test_a_late_line_in_a_shard_never_written_is_refused_after_the_manifest(
    redis: Redis, store: ResultStore, s3: Any, sink: Sink
) -> None:
    """A cancelled job's item still in flight past the redelivery window (an inference
    backlog) must not start a shard that the written _manifest.json does not list."""
    keys = RedisKeys()
    await create_output_job(redis, keys, "j6", f"s3://{BUCKET}/j6/", shard_size=4, total=20)
    await store.record_many([result("j6", s) for s in (0, 1, 2)])
    await redis.hset(keys.job("j6"), mapping={"state": "cancelled", "cancelled_at": time.time()})  # type: ignore[misc]
    await eventually(lambda: manifest_written(redis, keys, "j6"), within=30)
    before = await redis.hgetall(keys.job("j6"))  # type: ignore[misc]
    assert await store.record(result("j6", 17)) is False  # shard 4: never staged, never written
    assert await redis.hgetall(keys.job("j6")) == before  # type: ignore[misc]  # no counter moved
    assert not await redis.exists(keys.job_shard("j6", 4), keys.job_staged("j6"))
    assert not await redis.sismember(keys.sinking_jobs, "j6")  # type: ignore[misc]
    assert read_manifest(s3, "j6/")["lines"] == 3


async def seen_by_sink(redis: Redis, keys: RedisKeys, job_id: str) -> tuple[Sink, OutputJob]:
    """A sink holding the job's lease, and the job as its round read it."""
    sink = Sink(redis, keys, sink_settings(redis))
    assert await sink.lease.acquire(job_id)
    seen = _job(job_id, await redis.hmget(keys.job(job_id), _FIELDS))  # type: ignore[misc]
    assert seen is not None
    return sink, seen


async def test_a_cancel_while_the_manifest_is_written_makes_it_again(
    redis: Redis, store: ResultStore, s3: Any
) -> None:
    """Every item settled, the sink wrote a "completed" manifest, and the job was
    cancelled before that was recorded: manifest and job must agree (cancelled)."""
    keys = RedisKeys()
    await create_output_job(redis, keys, "j7", f"s3://{BUCKET}/j7/", shard_size=4, total=6)
    await store.record_many([result("j7", s) for s in range(6)])
    sink, seen = await seen_by_sink(redis, keys, "j7")
    assert seen.state == "running" and seen.settled(sink.window_s, time.time())
    for shard in (0, 1):
        assert await sink.write_shard(seen, shard)
    await redis.hset(keys.job("j7"), mapping={"state": "cancelled", "cancelled_at": time.time()})  # type: ignore[misc]
    assert await sink.finish(seen) is False
    assert not await manifest_written(redis, keys, "j7")
    await sink.run_job("j7")
    assert read_manifest(s3, "j7/")["state"] == "cancelled"
    job = await redis.hgetall(keys.job("j7"))  # type: ignore[misc]
    assert job[b"state"] == b"cancelled" and b"manifest_at" in job


async def test_a_line_staged_while_the_manifest_is_written_is_listed(
    redis: Redis, store: ResultStore, s3: Any
) -> None:
    """A cancelled job past its window: the sink wrote the staged shards and found
    none left, then a late line landed before the manifest was recorded. It must be in
    the output (its counter moved), not dropped with the staging keys."""
    keys = RedisKeys()
    await create_output_job(redis, keys, "j8", f"s3://{BUCKET}/j8/", shard_size=4, total=12)
    await store.record_many([result("j8", s) for s in range(6)])
    long_ago = {"state": "cancelled", "cancelled_at": time.time() - 60}  # its window is over
    await redis.hset(keys.job("j8"), mapping=long_ago)  # type: ignore[misc]
    sink, seen = await seen_by_sink(redis, keys, "j8")
    assert seen.settled(sink.window_s, time.time())
    for shard in (0, 1):
        assert await sink.write_shard(seen, shard)
    assert await store.record(result("j8", 9))  # shard 2, late
    assert await sink.finish(seen) is False
    assert not await manifest_written(redis, keys, "j8")
    await sink.run_job("j8")
    doc = read_manifest(s3, "j8/")
    assert doc["state"] == "cancelled" and doc["lines"] == 7, doc
    assert [x["seq"] for x in all_lines(s3, "j8/")] == [0, 1, 2, 3, 4, 5, 9]
    job = await redis.hgetall(keys.job("j8"))  # type: ignore[misc]
    assert int(job[b"done"]) + int(job[b"failed"]) == 7  # the counters equal the lines
    assert await keys_left(redis, "tagpipe") == [keys.job("j8"), keys.job_shards("j8")]


async def test_a_result_without_a_seq_never_completes_an_output_job(
    redis: Redis, store: ResultStore
) -> None:
    """A worker of a release before `seq` (messages ignore unknown fields, so it drops
    the field) writes through the inline script: that must not complete the job
    before its _manifest.json exists."""
    keys = RedisKeys()
    await create_output_job(redis, keys, "j9", f"s3://{BUCKET}/j9/", shard_size=4, total=1)
    assert await store.record(result("j9", 0).model_copy(update={"seq": None}))
    assert await redis.hget(keys.job("j9"), K.JOB_STATE) == b"running"  # type: ignore[misc]
