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


async def test_a_cancelled_job_ends_at_once_and_counts_its_unfinished_items(
    client: httpx.AsyncClient, js: JetStreamContext, store: ResultStore
) -> None:
    urls = [f"http://img.example/{i}.jpg" for i in range(4)]
    job_id = (await client.post("/v1/jobs", json=urls)).json()["job_id"]
    await wait_status(client, job_id, submitted=4, state="running")
    tasks = await pull_tasks(js, Lane.BULK, 4)
    await store.record_many([ok(t) for t in tasks[:2]])

    ended = (await client.delete(f"/v1/jobs/{job_id}")).json()
    # Over at once: the two items without a result count as cancelled, none is written.
    assert (ended["state"], ended["done"], ended["cancelled"], ended["finished"]) == (
        "cancelled",
        2,
        2,
        4,
    )
    assert ended["finished_at"] is not None and ended["eta_s"] is None
    elapsed = ended["finished_at"] - ended["created_at"]
    assert ended["rate_per_s"] == pytest.approx(2 / max(elapsed, 1e-3))  # work done, not skips

    # An item already past its download finishes anyway: it moves from cancelled to done.
    await store.record(ok(tasks[2]))
    late = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert (late["done"], late["cancelled"], late["finished"]) == (3, 1, 4)
    assert late["finished_at"] == ended["finished_at"]  # the clock stopped at the cancel
    await asyncio.sleep(0.2)
    again = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert (again["rate_per_s"], again["finished_at"]) == (late["rate_per_s"], late["finished_at"])


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
