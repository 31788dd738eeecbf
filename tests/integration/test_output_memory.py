"""Redis memory of a job with an output: bounded by what is in flight, not by the job.

Issue #29: after a job of at least 20,000 items has ended and the redelivery window
(max deliver x ack wait) has passed, at most 16 B per item stay in Redis above the
level before the job; and the peak during a 20,000-item job is within 1.2x of the
peak during a 5,000-item job.

The workers are modelled, not run (the real model on 25,000 items is minutes of a
2-core box): results are fed to the real ResultStore as the inference workers
record them, in batches of 100 at about 1,000 items/s, out of order within a
window of 1,000 items in flight, with 2 % of them recorded twice (redeliveries).
The next window starts only while the sink keeps up, by the reader's own rule
(manifest.sink_has_room).
Everything else is real: Redis, the gateway's sink in-process, a moto S3 server.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from tagpipe_common import keys as K
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import Tag, TagResult
from tagpipe_common.results import ResultStore
from tagpipe_gateway.manifest import sink_has_room
from tagpipe_gateway.settings import GatewaySettings
from tagpipe_gateway.sink import Sink

from tests.integration.output_kit import BUCKET, all_lines, create_output_job, read_manifest
from tests.integration.output_kit import result as base_result
from tests.s3kit import moto_s3, s3_client
from tests.tools import eventually

__all__ = ["moto_s3"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARD_SIZE = 1000
IN_FLIGHT = 1000
MAX_READY = GatewaySettings.model_fields["sink_max_ready_shards"].default
BATCH = 100
BATCH_EVERY_S = 0.1
ACK_WAIT_S, MAX_DELIVER = 0.5, 2  # the redelivery window: 1 s
TOP5 = [Tag(label=f"label number {i}", score=0.9 / (i + 1), class_id=100 + i) for i in range(5)]


@pytest.fixture
def s3(moto_s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for k, v in moto_s3.items():
        monkeypatch.setenv(k, v)
    client = s3_client(moto_s3)
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
async def sink(redis: Redis) -> AsyncIterator[Sink]:
    port = redis.connection_pool.connection_kwargs["port"]
    settings = GatewaySettings(
        redis_url=f"redis://127.0.0.1:{port}/0",
        ack_wait_s=ACK_WAIT_S,
        max_deliver=MAX_DELIVER,
        lease_s=5,
        recover_interval_s=0.2,
    )
    s = Sink(redis, RedisKeys(), settings)
    s.start()
    yield s
    await s.close()


def result(job_id: str, seq: int) -> TagResult:
    r = base_result(job_id, seq)
    return r.model_copy(update={"tags": TOP5}) if r.status == "ok" else r


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def run_job(redis: Redis, store: ResultStore, job_id: str, n: int) -> dict[str, int]:
    """Feed a job's results as the workers would; Redis memory before, peak, after."""
    keys = RedisKeys()
    before = await used_memory(redis)
    await create_output_job(redis, keys, job_id, f"s3://{BUCKET}/{job_id}/", SHARD_SIZE, None)
    rng = random.Random(n)
    peak = before
    for start in range(0, n, IN_FLIGHT):
        # The reader publishes the next window only while the sink keeps up (as
        # ManifestReader does): on a busy box the sink lags, and without this the
        # staged lines would grow with the job.
        await eventually(lambda: sink_has_room(redis, keys, job_id, MAX_READY), within=120)
        window = list(range(start, min(start + IN_FLIGHT, n)))
        rng.shuffle(window)  # items in flight finish in any order
        for b in range(0, len(window), BATCH):
            seqs = window[b : b + BATCH]
            again = [s for s in seqs if rng.random() < 0.02]  # redelivered after the write
            await store.record_many([result(job_id, s) for s in seqs + again])
            peak = max(peak, await used_memory(redis))
            await asyncio.sleep(BATCH_EVERY_S)
    await redis.hset(keys.job(job_id), K.JOB_TOTAL, str(n))  # type: ignore[misc]  # reader's EOF

    async def completed() -> bool:
        state = await redis.hget(keys.job(job_id), K.JOB_STATE)  # type: ignore[misc]
        return bool(state == b"completed")

    await eventually(completed, within=120)
    await asyncio.sleep(MAX_DELIVER * ACK_WAIT_S + 1)  # the redelivery window
    return {"before": before, "peak": peak, "after": await used_memory(redis)}


async def test_redis_holds_what_is_in_flight_not_the_job(redis: Redis, s3: Any, sink: Sink) -> None:
    store = ResultStore(redis, RedisKeys())
    small = await run_job(redis, store, "mem5k", 5000)
    large = await run_job(redis, store, "mem20k", 20000)
    print(f"redis used_memory 5k: {small}, 20k: {large}")
    per_item = (large["after"] - large["before"]) / 20000
    assert per_item <= 16, f"{per_item:.1f} B per item stayed in Redis: {large}"
    assert large["peak"] <= 1.2 * small["peak"], (small, large)
    lines = all_lines(s3, "mem20k/")
    assert [x["seq"] for x in lines] == list(range(20000))  # one line per item, none twice
    doc = read_manifest(s3, "mem20k/")
    assert doc["lines"] == 20000 and len(doc["shards"]) == 20000 // SHARD_SIZE
