"""The rest of the job API: listing a caller's jobs, cancelling a large job without
a write per item, and an Idempotency-Key that holds for the job's life.

The gateway in-process against real NATS and Redis; the test plays the workers
through the real queue and ResultStore.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from nats.js.client import JetStreamContext
from redis.asyncio import Redis
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import DownloadTask, Tag, TagResult
from tagpipe_common.results import ResultStore
from tagpipe_common.subjects import Lane

from tests.integration.gateway_kit import gateway_client, pull_tasks
from tests.tools import eventually

pytestmark = pytest.mark.integration

KEY, OTHER = "list-key-0123", "list-other-4567"
FAST = {"backlog_cache_s": 0, "bulk_batch_size": 4, "bulk_backlog_limit": 20}
KEYS = RedisKeys()


@pytest.fixture
async def client(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(nats_proc, redis_proc, [KEY, OTHER], **FAST) as c:
        yield c


def ok(task: DownloadTask) -> TagResult:
    return TagResult(**task.ref(), status="ok", tags=[Tag(label="tabby", score=0.9)])


async def submit(c: httpx.AsyncClient, n: int, **kw: Any) -> str:
    r = await c.post("/v1/jobs", json=[f"http://img.example/{i}.jpg" for i in range(n)], **kw)
    assert r.status_code in (200, 202), r.text
    job_id: str = r.json()["job_id"]
    return job_id


async def pages(
    c: httpx.AsyncClient, headers: dict[str, str] | None = None, **params: Any
) -> list[list[str]]:
    """Every page of GET /v1/jobs, as job ids."""
    out, cursor = [], None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        body = (await c.get("/v1/jobs", params=query, headers=headers)).json()
        out.append([j["job_id"] for j in body["jobs"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return out


async def test_the_list_pages_newest_first_filters_by_state_and_shows_only_mine(
    client: httpx.AsyncClient,
) -> None:
    mine = [await submit(client, 1) for _ in range(5)]
    other = {"Authorization": f"Bearer {OTHER}"}
    theirs = await submit(client, 1, headers=other)
    await client.delete(f"/v1/jobs/{mine[1]}")
    await client.delete(f"/v1/jobs/{mine[3]}")

    listed = await pages(client, limit=2)
    assert [j for page in listed for j in page] == mine[::-1]  # newest first, each once
    assert all(len(page) <= 2 for page in listed)
    assert await pages(client, state="cancelled") == [[mine[3], mine[1]]]
    both = (await client.get("/v1/jobs", params={"state": "cancelled"})).json()["jobs"]
    assert {j["state"] for j in both} == {"cancelled"} and both[0]["total"] == 1

    # Another caller sees only its own job, and cannot page into mine with my cursor.
    assert await pages(client, headers=other) == [[theirs]]
    cursor = (await client.get("/v1/jobs", params={"limit": 1})).json()["next_cursor"]
    after = (await client.get("/v1/jobs", params={"cursor": cursor}, headers=other)).json()
    assert [j["job_id"] for j in after["jobs"]] in ([], [theirs])

    # A job created between pages sorts above the cursor: the next page is unchanged.
    first = (await client.get("/v1/jobs", params={"limit": 2})).json()
    await submit(client, 1)
    second = await client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]})
    assert [j["job_id"] for j in second.json()["jobs"]] == mine[::-1][2:4]

    for bad in ({"state": "lost"}, {"cursor": "nope"}, {"limit": 0}):
        r = await client.get("/v1/jobs", params=bad)
        assert r.status_code == 422 and r.json()["code"] == "validation_error", bad


async def test_cancelling_a_large_job_midway_writes_no_result_per_item(
    client: httpx.AsyncClient, js: JetStreamContext, store: ResultStore, redis: Redis
) -> None:
    n = 3000
    job_id = await submit(client, n)

    # The submitter publishes until the bulk backlog limit (20) and pauses there.
    async def paused() -> bool:
        return bool((await client.get(f"/v1/jobs/{job_id}")).json()["submitted"] >= 20)

    await eventually(paused, within=30)
    tasks = await pull_tasks(js, Lane.BULK, 10)
    await store.record_many([ok(t) for t in tasks[:6]])

    ended = (await client.delete(f"/v1/jobs/{job_id}")).json()
    assert ended["state"] == "cancelled" and ended["finished_at"] is not None
    assert (ended["total"], ended["done"], ended["failed"]) == (n, 6, 0)
    assert ended["done"] + ended["failed"] + ended["cancelled"] == n == ended["finished"]

    # The submitter stops: the job leaves the submitting set, nothing more is published.
    async def stopped() -> bool:
        return not await redis.sismember(KEYS.submitting_jobs, job_id)  # type: ignore[misc]

    await eventually(stopped, within=30)
    published = (await client.get(f"/v1/jobs/{job_id}")).json()["submitted"]
    assert published < n
    await asyncio.sleep(0.5)
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["submitted"] == published

    # Redis holds the 6 results and nothing per cancelled item.
    assert await redis.xlen(KEYS.job_results(job_id)) == 6
    result_keys = [k async for k in redis.scan_iter(match=KEYS.result(f"{job_id}-*"), count=1000)]
    assert len(result_keys) == 6
    assert await redis.hget(KEYS.job(job_id), "cancelled") == b"0"  # type: ignore[misc]
    lines = (await client.get(f"/v1/jobs/{job_id}/results")).text.splitlines()
    assert len(lines) == 6 and all('"status":"ok"' in line for line in lines)


async def test_an_idempotency_key_holds_through_a_long_upload_and_for_the_jobs_life(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext, redis: Redis
) -> None:
    lock = {"idempotency_upload_lock_s": 0.3}  # an upload outlives it many times over
    async with gateway_client(nats_proc, redis_proc, [KEY], **FAST, **lock) as c:
        headers = {"Idempotency-Key": "nightly-42", "Content-Type": "application/x-ndjson"}
        release = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b'"http://img.example/1.jpg"\n'
            await release.wait()
            yield b'"http://img.example/2.jpg"\n'

        first = asyncio.create_task(c.post("/v1/jobs", content=slow_body(), headers=headers))
        await asyncio.sleep(1.5)  # five lock periods: only renewal keeps the key held
        during = await c.post("/v1/jobs", content=b'"http://x.example/a"\n', headers=headers)
        assert during.status_code == 409 and during.json()["code"] == "conflict", during.text
        release.set()
        created = (await first).json()
        assert created["total"] == 2 and not created["reused"]

        again = await c.post("/v1/jobs", content=b'"http://x.example/b"\n', headers=headers)
        assert again.status_code == 200, again.text
        assert again.json()["job_id"] == created["job_id"] and again.json()["reused"]
        # The key lives exactly as long as the job's hash.
        idem_ttl = await redis.ttl(KEYS.idempotency(f"{_principal(KEY)}:nightly-42"))
        job_ttl = await redis.ttl(KEYS.job(created["job_id"]))
        assert job_ttl > 600 and abs(idem_ttl - job_ttl) <= 2


def _principal(key: str) -> str:
    from tagpipe_gateway.auth import ApiKeys, parse_entries

    return ApiKeys(tuple(parse_entries(key))).principal(key)
