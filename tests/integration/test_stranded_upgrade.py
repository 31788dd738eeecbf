"""A worker with the stranded-item sweeper on a deployment made by an older
operator (work streams, no advisory stream), on real NATS JetStream and Redis:
the sweeper neither fails nor stops the worker; it polls quietly and settles
stranded items once the stream exists (the operator's next ensure_streams).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from redis.asyncio import Redis
from tagpipe_common.advisories import advisory_stream, ensure_advisories
from tagpipe_common.messages import DownloadTask
from tagpipe_common.results import ResultStore
from tagpipe_common.stranded import StrandedSweeper
from tagpipe_common.streams import StreamPolicy
from tagpipe_common.subjects import Lane, Stage, stage_names

from tests.tools import eventually

pytestmark = pytest.mark.integration

DL = stage_names(Stage.DOWNLOAD)


@pytest.fixture
def policy() -> StreamPolicy:
    # Short leases, few deliveries: an item strands within seconds.
    return StreamPolicy(
        prefix="tagpipe", ack_wait_s=1.0, max_deliver=2, ack_wait_overrides={Stage.DOWNLOAD: 1.0}
    )


async def never_ack(js: JetStreamContext) -> None:
    """Take every delivery and drop it, as a worker killed with each one would."""
    sub = await js.pull_subscribe_bind(DL.consumer(Lane.BULK), stream=DL.stream)
    while True:
        with contextlib.suppress(TimeoutError):
            await sub.fetch(1, timeout=0.5)


async def test_a_sweeper_outlives_a_missing_advisory_stream(
    js: JetStreamContext, store: ResultStore, redis: Redis, policy: StreamPolicy
) -> None:
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(advisory_stream(policy.prefix))
    sweeper = StrandedSweeper(js, store, Stage.DOWNLOAD, policy.prefix, poll_s=0.2)
    stop = asyncio.Event()
    running = asyncio.create_task(sweeper.run(stop))
    dying = None
    try:
        await asyncio.sleep(2.0)  # about ten polls with nothing to bind to
        assert not running.done()
        await ensure_advisories(js, policy)
        await redis.hset("tagpipe:job:job-m", mapping={"total": 1, "state": "running"})
        task = DownloadTask(item_id="late", job_id="job-m", lane=Lane.BULK, url="http://x/l")
        await js.publish(DL.subject(Lane.BULK), task.to_json())
        dying = asyncio.create_task(never_ack(js))
        result = await eventually(lambda: store.get("late"), within=60)
        assert result.code == "retries_exhausted"
        assert sweeper.settled == 1
    finally:
        if dying is not None:
            dying.cancel()
            await asyncio.gather(dying, return_exceptions=True)
        stop.set()
        await asyncio.wait_for(running, 10.0)
