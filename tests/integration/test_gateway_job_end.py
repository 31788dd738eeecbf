"""How a job reads once it is over, whether it completed or was cancelled, and the
request id every problem carries.

The gateway in-process against real NATS and Redis; the test plays the workers
through the real queue and ResultStore.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from nats.js.client import JetStreamContext
from redis.asyncio import Redis
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.errors import ErrorCode
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import DownloadTask, Tag, TagResult
from tagpipe_common.results import ResultStore
from tagpipe_common.subjects import Lane, Stage, stage_names

from tests.integration.gateway_kit import gateway_client, pull_tasks, wait_status

pytestmark = pytest.mark.integration

DOWNLOAD = stage_names(Stage.DOWNLOAD)


@pytest.fixture
async def client(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> AsyncIterator[httpx.AsyncClient]:
    fast = {"backlog_cache_s": 0, "bulk_batch_size": 4, "realtime_timeout_s": 0.5}
    async with gateway_client(nats_proc, redis_proc, ["end-key-0123"], **fast) as c:
        yield c


def ok(task: DownloadTask) -> TagResult:
    return TagResult(**task.ref(), status="ok", tags=[Tag(label="tabby", score=0.9)])


def cancelled(task: DownloadTask) -> TagResult:
    return TagResult.error(task, ErrorCode.CANCELLED, "the job was cancelled")


async def test_a_cancelled_job_ends_like_a_completed_one(
    client: httpx.AsyncClient, js: JetStreamContext, store: ResultStore
) -> None:
    urls = [f"http://img.example/{i}.jpg" for i in range(4)]
    job_id = (await client.post("/v1/jobs", json=urls)).json()["job_id"]
    await wait_status(client, job_id, submitted=4, state="running")
    tasks = await pull_tasks(js, Lane.BULK, 4)
    await store.record_many([ok(t) for t in tasks[:2]])

    settling = (await client.delete(f"/v1/jobs/{job_id}")).json()
    # Two items are still in a worker's hands: not over yet, and no ETA for a cancelled job.
    assert settling["state"] == "cancelled" and settling["finished"] == 2
    assert settling["finished_at"] is None and settling["eta_s"] is None

    # One in-flight item finishes anyway, the other is dropped by its worker.
    await store.record_many([ok(tasks[2]), cancelled(tasks[3])])
    over = await wait_status(client, job_id, finished=4)
    assert (over["done"], over["cancelled"], over["state"]) == (3, 1, "cancelled")
    assert over["finished_at"] is not None and over["eta_s"] is None
    elapsed = over["finished_at"] - over["created_at"]
    assert over["rate_per_s"] == pytest.approx(4 / max(elapsed, 1e-3))
    await asyncio.sleep(0.2)  # the clock has stopped: a later read says the same
    again = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert (again["rate_per_s"], again["finished_at"]) == (over["rate_per_s"], over["finished_at"])


async def test_cancelling_a_job_whose_items_all_settled_ends_it_at_once(
    client: httpx.AsyncClient, js: JetStreamContext, store: ResultStore, redis: Redis
) -> None:
    job_id = (await client.post("/v1/jobs", json=["http://img.example/a.jpg"])).json()["job_id"]
    await wait_status(client, job_id, submitted=1, state="running")
    (task,) = await pull_tasks(js, Lane.BULK, 1)
    # The item settles while the job still reads `submitting` (a gateway resuming it):
    # the ResultStore only completes running jobs, so the cancel has to end it.
    await redis.hset(RedisKeys().job(job_id), "state", "submitting")  # type: ignore[misc]
    await store.record(ok(task))
    status = (await client.delete(f"/v1/jobs/{job_id}")).json()
    assert status["state"] == "cancelled" and status["finished"] == 1
    assert status["finished_at"] is not None and status["eta_s"] is None


async def test_every_problem_carries_the_request_id_of_its_response(
    client: httpx.AsyncClient,
) -> None:
    missing = await client.get("/v1/jobs/j-nope")
    invalid = await client.post("/v1/tags", json={"url": "gopher://x"})
    unauthorized = await client.get("/v1/jobs/j-nope", headers={"Authorization": "Bearer x"})
    # No worker runs here: a 504, whose request id also fetches the results later.
    timeout = await client.post("/v1/tags", json={"url": "http://img.example/a.jpg"})
    assert timeout.status_code == 504
    later = await client.get(f"/v1/results/{timeout.json()['request_id']}")
    assert later.json()["items"][0]["status"] == "pending"
    ids = set()
    for r in (missing, invalid, unauthorized, timeout):
        assert r.headers["content-type"] == "application/problem+json", r.text
        request_id = r.json()["request_id"]
        assert request_id == r.headers["x-request-id"] and len(request_id) == 32
        ids.add(request_id)
    assert len(ids) == 4  # one per request
    assert (await client.get("/healthz")).headers["x-request-id"]


async def test_problems_made_outside_the_handlers_carry_the_id_too(
    client: httpx.AsyncClient, nats_proc: ServerProcess
) -> None:
    nats_proc.stop()
    for r in (
        await client.get("/readyz/dependencies"),  # built by the route itself
        await client.post("/v1/tags", json={"url": "http://img.example/a.jpg"}),  # NATS down
    ):
        assert r.status_code == 503, r.text
        assert r.json()["request_id"] == r.headers["x-request-id"]
