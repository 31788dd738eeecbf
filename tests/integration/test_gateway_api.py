"""The gateway in-process (httpx ASGITransport) against real NATS and Redis.

No downloader or inference runs here: where a test needs results, it plays the
worker itself through the real queue and the real ResultStore.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from tagpipe_common.streams import StreamPolicy, ensure_streams
from tagpipe_common.subjects import Lane, Stage, stage_names
from tagpipe_gateway.submit import item_id_for

from tests.integration.gateway_kit import gateway_client, pull_tasks, wait_status

pytestmark = pytest.mark.integration

KEY = "test-key-123"
OTHER = "another-tenant-456"
DOWNLOAD = stage_names(Stage.DOWNLOAD)


def gateway(
    nats_proc: ServerProcess, redis_proc: ServerProcess, **overrides: Any
) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
    fast = {
        "realtime_timeout_s": 1.5,
        "realtime_backlog_limit": 20,
        "bulk_backlog_limit": 20,
        "backlog_cache_s": 0,
        "bulk_batch_size": 4,
    }
    return gateway_client(nats_proc, redis_proc, [KEY, OTHER], **{**fast, **overrides})


@pytest.fixture
async def client(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway(nats_proc, redis_proc) as c:
        yield c


def ok_result(task: DownloadTask, label: str = "tabby") -> TagResult:
    return TagResult(**task.ref(), status="ok", tags=[Tag(label=label, score=0.9)], source=task.url)


async def test_missing_or_wrong_key_is_401_and_health_stays_open(client: httpx.AsyncClient) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        r = await client.post("/v1/tags", json={"url": "http://x/a.jpg"}, headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "unauthorized"
        assert KEY not in r.text
    assert (await client.get("/healthz", headers={"Authorization": ""})).status_code == 200
    for path in ("/readyz", "/readyz/dependencies"):
        ready = await client.get(path, headers={"Authorization": ""})
        assert ready.status_code == 200, ready.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"urls": ["http://ok/a.jpg", "ftp://bad/b.jpg"]}, "body.urls[1]"),
        ({"url": "http://ok/a.jpg", "urls": ["ftp://bad/b.jpg"]}, "body.urls[0]"),
        ({"url": 5}, "body.url"),
        ({"url": "http://ok/a.jpg", "top_k": 0}, "body.top_k"),
        ({"url": "http://ok/a.jpg", "colour": "red"}, "body.colour"),
        ({}, "body.url"),
    ],
)
async def test_422_names_the_field(
    client: httpx.AsyncClient, body: dict[str, object], field: str
) -> None:
    r = await client.post("/v1/tags", json=body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "validation_error"
    assert problem["type"].endswith("/validation_error")
    assert field in [e["field"] for e in problem["errors"]]


async def test_bulk_422_names_the_line(client: httpx.AsyncClient) -> None:
    body = '{"url": "http://ok/a.jpg"}\n{"id": "x"}\n'
    r = await client.post(
        "/v1/jobs", content=body, headers={"Content-Type": "application/x-ndjson"}
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "line[2].url"
    r = await client.post("/v1/jobs", json=["http://ok/a.jpg", {"url": "gopher://x"}])
    assert r.json()["errors"][0]["field"] == "body[1].url"


async def test_429_when_the_realtime_backlog_is_above_the_limit_and_not_for_bulk(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    for i in range(25):  # nobody consumes: bulk work waits on its own lane
        await js.publish(DOWNLOAD.subject(Lane.BULK), b"{}", headers={"Nats-Msg-Id": f"b{i}"})
    url = {"url": "http://img.example/a.jpg"}
    behind_bulk = await client.post("/v1/tags", params={"timeout_ms": 300}, json=url)
    assert behind_bulk.status_code == 504, behind_bulk.text  # admitted; nobody serves it
    for i in range(25):  # real-time work ahead, over the limit of 20
        await js.publish(DOWNLOAD.subject(Lane.REALTIME), b"{}", headers={"Nats-Msg-Id": f"r{i}"})
    r = await client.post("/v1/tags", json=url)  # backlog_cache_s 0: read afresh
    assert r.status_code == 429
    assert r.json()["code"] == "backlog_full"
    assert "real-time" in r.json()["detail"]
    assert int(r.headers["Retry-After"]) >= 1


async def test_realtime_result_arrives_through_the_notification(
    client: httpx.AsyncClient, js: JetStreamContext, store: ResultStore
) -> None:
    async def worker() -> None:
        (task,) = await pull_tasks(js, Lane.REALTIME, 1)
        await store.record(ok_result(task, "espresso"))

    w = asyncio.create_task(worker())
    r = await client.post("/v1/tags", json={"urls": ["http://img.example/c.jpg"], "top_k": 3})
    await w
    assert r.status_code == 200, r.text
    (item,) = r.json()["items"]
    assert item["status"] == "ok"
    assert item["tags"][0]["label"] == "espresso"


async def test_upload_is_parked_in_redis_and_sent_as_blob_key(
    client: httpx.AsyncClient, js: JetStreamContext, redis: Redis, store: ResultStore
) -> None:
    async def worker() -> bytes | None:
        (task,) = await pull_tasks(js, Lane.REALTIME, 1)
        assert task.url is None and task.blob_key == RedisKeys().blob(task.item_id)
        blob: bytes | None = await redis.get(task.blob_key)
        await store.record(ok_result(task))
        return blob

    w = asyncio.create_task(worker())
    r = await client.post(
        "/v1/tags?top_k=2", content=b"\x89PNG fake bytes", headers={"Content-Type": "image/png"}
    )
    assert r.status_code == 200, r.text
    assert await w == b"\x89PNG fake bytes"


async def test_504_on_timeout_then_results_by_request_id(
    client: httpx.AsyncClient, js: JetStreamContext, store: ResultStore
) -> None:
    r = await client.post(
        "/v1/tags", json={"urls": ["http://img.example/a.jpg", "http://img.example/b.jpg"]}
    )
    assert r.status_code == 504
    problem = r.json()
    assert problem["code"] == "timeout"
    request_id = problem["request_id"]

    later = (await client.get(f"/v1/results/{request_id}")).json()
    assert later["complete"] is False
    assert [i["status"] for i in later["items"]] == ["pending", "pending"]

    for task in await pull_tasks(js, Lane.REALTIME, 2):
        await store.record(ok_result(task))
    later = (await client.get(f"/v1/results/{request_id}")).json()
    assert later["complete"] is True
    assert [i["source"] for i in later["items"]] == [
        "http://img.example/a.jpg",
        "http://img.example/b.jpg",
    ]
    assert (await client.get("/v1/results/nope")).status_code == 404


async def test_idempotent_resubmission_returns_the_same_job(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    lines = "".join(
        json.dumps({"url": f"http://img.example/{i}.jpg", "id": f"c{i}"}) + "\n" for i in range(6)
    )
    headers = {"Content-Type": "application/x-ndjson", "Idempotency-Key": "order-42"}
    first = await client.post("/v1/jobs", content=lines, headers=headers)
    assert first.status_code == 202, first.text
    second = await client.post("/v1/jobs", content=lines, headers=headers)
    assert second.status_code == 200
    assert second.json()["job_id"] == first.json()["job_id"]
    assert second.json()["reused"] is True
    await wait_status(client, first.json()["job_id"], submitted=6, state="running")
    info = await js.consumer_info(DOWNLOAD.stream, DOWNLOAD.consumer(Lane.BULK))
    assert info.num_pending == 6  # published once, not twice


async def test_repeated_client_id_and_repeated_url_within_a_job(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    items = [
        {"url": "http://img.example/a.jpg", "id": "a"},
        {"url": "http://img.example/a.jpg", "id": "a"},  # the same item again: a no-op
        {"url": "http://img.example/a.jpg", "id": "b"},  # same URL, other item: duplicate_url
        {"url": "http://img.example/c.jpg", "id": "c"},
    ]
    job = (await client.post("/v1/jobs", json=items)).json()
    status = await wait_status(client, job["job_id"], state="running")
    assert status["total"] == 3 and status["failed"] == 1
    info = await js.consumer_info(DOWNLOAD.stream, DOWNLOAD.consumer(Lane.BULK))
    assert info.num_pending == 2
    lines = (await client.get(f"/v1/jobs/{job['job_id']}/results")).text.splitlines()
    (dup,) = [json.loads(x) for x in lines]
    assert dup["client_item_id"] == "b" and dup["code"] == "duplicate_url"


async def test_results_resume_from_a_cursor(
    client: httpx.AsyncClient, js: JetStreamContext, store: ResultStore
) -> None:
    urls = [f"http://img.example/{i}.jpg" for i in range(7)]
    job_id = (await client.post("/v1/jobs", json=urls)).json()["job_id"]
    await wait_status(client, job_id, submitted=7)
    tasks = await pull_tasks(js, Lane.BULK, 7)
    await store.record_many([ok_result(t) for t in tasks])
    await wait_status(client, job_id, state="completed", done=7)

    url = f"/v1/jobs/{job_id}/results"
    head = [json.loads(x) for x in (await client.get(url, params={"limit": 3})).text.splitlines()]
    assert len(head) == 3
    rest = (await client.get(url, params={"cursor": head[-1]["cursor"]})).text.splitlines()
    everything = head + [json.loads(x) for x in rest]
    assert sorted(r["source"] for r in everything) == sorted(urls)
    assert len({r["cursor"] for r in everything}) == 7
    bad = await client.get(url, params={"cursor": "x"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "query.cursor"


async def test_cancel_marks_the_job_and_unknown_jobs_are_404(client: httpx.AsyncClient) -> None:
    job_id = (await client.post("/v1/jobs", json=["http://img.example/a.jpg"])).json()["job_id"]
    r = await client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert (await client.get("/v1/jobs/j-nope")).json()["code"] == "not_found"
    assert (await client.delete("/v1/jobs/j-nope")).status_code == 404


async def test_redis_down_is_503(client: httpx.AsyncClient, redis_proc: ServerProcess) -> None:
    redis_proc.stop()
    r = await client.get("/v1/jobs/j-any")
    assert r.status_code == 503
    assert r.json()["code"] == "redis_unavailable"


async def test_a_dead_gateways_job_is_resumed_by_another(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext, redis: Redis
) -> None:
    paced = {"bulk_backlog_limit": 4, "lease_s": 2, "recover_interval_s": 0.3}
    urls = [f"http://img.example/{i}.jpg" for i in range(12)]
    async with gateway(nats_proc, redis_proc, **paced) as first:
        job_id = (await first.post("/v1/jobs", json=urls)).json()["job_id"]
        # Two batches of 4 fill the bulk limit; the third waits for room.
        await wait_status(first, job_id, submitted=8)
    # `first` shut down mid-job and handed its lease back...
    lease = RedisKeys().job_lease(job_id)
    assert await redis.get(lease) is None
    # ...but a crashed gateway would still hold it until it expires.
    await redis.set(lease, "crashed-gateway", ex=2)
    published = await pull_tasks(js, Lane.BULK, 8)
    async with gateway(nats_proc, redis_proc, **paced) as second:
        # Not before the crashed gateway's lease expires; then from its checkpoint.
        assert (await second.get(f"/v1/jobs/{job_id}")).json()["submitted"] == 8
        await wait_status(second, job_id, submitted=12, state="running")
        published += await pull_tasks(js, Lane.BULK, 4)
    assert sorted(t.item_id for t in published) == sorted(
        item_id_for(job_id, None, i) for i in range(12)
    )
    info = await js.consumer_info(DOWNLOAD.stream, DOWNLOAD.consumer(Lane.BULK))
    assert info.num_pending == 0  # nothing published twice


async def test_a_full_stream_is_backpressure_not_a_crash(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> None:
    await ensure_streams(js, StreamPolicy(prefix="tagpipe", max_msgs=2))
    async with gateway(nats_proc, redis_proc, realtime_backlog_limit=1000) as c:
        urls = [f"http://img.example/{i}.jpg" for i in range(3)]
        r = await c.post("/v1/tags", json={"urls": urls})
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "backlog_full"


async def test_wrong_media_size_and_route_are_problems(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> None:
    async with gateway(nats_proc, redis_proc, max_upload_bytes=1024) as c:
        big = await c.post("/v1/tags", content=b"x" * 2048, headers={"Content-Type": "image/png"})
        assert (big.status_code, big.json()["code"]) == (413, "payload_too_large")
        odd = await c.post("/v1/tags", content=b"<a/>", headers={"Content-Type": "text/xml"})
        assert (odd.status_code, odd.json()["code"]) == (415, "unsupported_media_type")
        missing = await c.get("/v1/nothing-here")
        assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
        assert missing.headers["content-type"] == "application/problem+json"


async def test_metrics_count_requests_and_finished_items(
    client: httpx.AsyncClient, js: JetStreamContext, store: ResultStore
) -> None:
    async def worker() -> None:
        (task,) = await pull_tasks(js, Lane.REALTIME, 1)
        await store.record(TagResult.error(task, "http_404", "gone", source=task.url))

    w = asyncio.create_task(worker())
    assert (
        await client.post("/v1/tags", json={"url": "http://img.example/x.jpg"})
    ).status_code == 200
    await w
    text = (await client.get("/metrics", headers={"Authorization": ""})).text
    assert 'tagpipe_gateway_requests_total{method="POST",route="/v1/tags",status="200"}' in text
    assert 'tagpipe_gateway_items_total{code="http_404",lane="realtime",status="error"}' in text
    assert 'tagpipe_gateway_item_latency_seconds_count{lane="realtime"}' in text


async def test_nats_down_is_503_and_the_dependency_check_says_so(
    client: httpx.AsyncClient, nats_proc: ServerProcess
) -> None:
    nats_proc.stop()
    r = await client.post("/v1/tags", json={"url": "http://img.example/a.jpg"})
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "nats_unavailable"
    live = await client.get("/readyz")  # still Ready: the Service keeps it (see health.py)
    assert live.status_code == 200 and live.json()["checks"]["nats"].startswith("error")
    ready = await client.get("/readyz/dependencies")
    assert ready.status_code == 503
    assert ready.headers["content-type"] == "application/problem+json"
    assert ready.json()["code"] == "not_ready"
    assert ready.json()["checks"]["nats"].startswith("error")


async def test_another_callers_job_and_request_look_missing(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    other = {"Authorization": f"Bearer {OTHER}"}
    job_id = (await client.post("/v1/jobs", json=["http://img.example/a.jpg"])).json()["job_id"]
    assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 200
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/results"),
        ("DELETE", f"/v1/jobs/{job_id}"),
    ]:
        r = await client.request(method, path, headers=other)
        assert (r.status_code, r.json()["code"]) == (404, "not_found"), (method, path)
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["state"] != "cancelled"

    timed_out = await client.post("/v1/tags", json={"url": "http://img.example/b.jpg"})
    request_id = timed_out.json()["request_id"]
    assert (await client.get(f"/v1/results/{request_id}")).status_code == 200
    assert (await client.get(f"/v1/results/{request_id}", headers=other)).status_code == 404


@pytest.mark.timeout(60)
async def test_follow_streams_results_until_the_job_is_over(
    client: httpx.AsyncClient, js: JetStreamContext, store: ResultStore
) -> None:
    urls = [f"http://img.example/f{i}.jpg" for i in range(5)]
    job_id = (await client.post("/v1/jobs", json=urls)).json()["job_id"]
    await wait_status(client, job_id, submitted=5, state="running")
    tasks = await pull_tasks(js, Lane.BULK, 5)
    await store.record_many([ok_result(t) for t in tasks[:2]])

    async def finish_later() -> None:
        await asyncio.sleep(0.5)
        await store.record_many([ok_result(t) for t in tasks[2:]])

    later = asyncio.create_task(finish_later())
    # Would run for the whole hour if the end of the job went unnoticed.
    r = await client.get(f"/v1/jobs/{job_id}/results", params={"follow": 3600})
    await later
    assert sorted(json.loads(x)["source"] for x in r.text.splitlines()) == sorted(urls)


async def test_a_multipart_job_without_its_file_part_is_a_422_naming_it(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v1/jobs", files={"other": ("x.txt", b"http://ok/a.jpg\n")})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in r.json()["errors"]] == ["body.file"]
