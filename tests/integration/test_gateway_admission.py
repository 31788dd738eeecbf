"""Real-time admission by expected wait, and the deadline a caller may lower, against
the in-process gateway with real NATS JetStream and Redis (no workers: what is
published stays queued, so the backlog is exactly what the test puts there)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from nats.js.client import JetStreamContext
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.messages import DownloadTask
from tagpipe_common.subjects import HDR_MSG_ID, Lane, Stage, stage_names

from tests.integration.gateway_kit import gateway_client

pytestmark = pytest.mark.integration
KEY = "admission-test-key"
INFER = stage_names(Stage.INFER)
DOWNLOAD = stage_names(Stage.DOWNLOAD)
URL = {"url": "http://img.example/a.jpg"}


@pytest.fixture
async def client(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> AsyncIterator[httpx.AsyncClient]:
    settings = {"realtime_timeout_s": 5.0, "backlog_cache_s": 0, "drain_rate_window_s": 10.0}
    async with gateway_client(nats_proc, redis_proc, [KEY], **settings) as c:
        yield c


async def test_timeout_ms_above_the_maximum_is_a_422_naming_the_field(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v1/tags", params={"timeout_ms": 5001}, json=URL)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert "query.timeout_ms" in [e["field"] for e in r.json()["errors"]]
    r = await client.post("/v1/tags", params={"timeout_ms": 0}, json=URL)
    assert r.status_code == 422 and "query.timeout_ms" in r.text


async def test_an_item_carries_the_deadline_the_caller_lowered(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    r = await client.post("/v1/tags", params={"timeout_ms": 300}, json=URL)
    assert r.status_code == 504  # nobody serves it: the wait ends at the caller's deadline
    sub = await js.pull_subscribe_bind(
        durable=DOWNLOAD.consumer(Lane.REALTIME), stream=DOWNLOAD.stream
    )
    [msg] = await sub.fetch(1, timeout=5)
    task = DownloadTask.from_json(msg.data)
    assert task.deadline is not None
    assert 0 < task.deadline - task.submitted_at <= 0.3 + 0.05


async def test_a_stalled_queue_refuses_and_a_drained_one_admits_again(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    for i in range(20):  # real-time work ahead that nobody completes
        await js.publish(INFER.subject(Lane.REALTIME), b"x", headers={HDR_MSG_ID: f"rt{i}"})
    # No rate measured yet: admitted (the fixed limits are the ceiling); it waits out
    # its 1 s deadline, which is also the first stretch of the drain-rate window.
    first = await client.post("/v1/tags", params={"timeout_ms": 1000}, json=URL)
    await asyncio.sleep(0.2)
    # Over more than a second of backlog nothing completed: rate 0, refused at once.
    refused = await client.post("/v1/tags", params={"timeout_ms": 1000}, json=URL)
    await _drain(js)
    again = await client.post("/v1/tags", params={"timeout_ms": 300}, json=URL)
    assert first.status_code == 504, first.text
    assert refused.status_code == 429, refused.text
    assert refused.json()["code"] == "backlog_full"
    assert "deadline" in refused.json()["title"].lower()
    assert int(refused.headers["Retry-After"]) >= 1
    assert again.status_code == 504, again.text  # admitted: nothing queued ahead any more


async def _drain(js: JetStreamContext) -> None:
    """Ack everything queued on the real-time lane of both stages."""
    for names in (INFER, DOWNLOAD):
        sub = await js.pull_subscribe_bind(
            durable=names.consumer(Lane.REALTIME), stream=names.stream
        )
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.5)
            except TimeoutError:
                break
            for m in msgs:
                await m.ack()
        await sub.unsubscribe()
