"""A gateway scaled down or rolled (SIGTERM) finishes or hands over what it is doing:
an upload in progress, a `/results?follow=` stream and a job it is tailing.

Each test runs real gateway processes (`tagpipe-gateway`, uvicorn) on a real NATS and
Redis (tagpipe_cli.stack, no workers). The test plays the downloader where a result is
needed: it takes the download tasks from JetStream and records results through the
ResultStore, as a worker does, so it decides when each result exists. The gateway's load
reports (requests in flight, for the operator) are read with the operator's own reader.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js.errors import NoKeysError
from redis.asyncio import Redis
from tagpipe_cli.servers import find_binary, free_port
from tagpipe_cli.stack import Service, Stack, StackConfig
from tagpipe_common import keys as K
from tagpipe_common.gatewayload import bucket_name, read_in_flight
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import TagResult
from tagpipe_common.nats_io import close_nats, connect_nats
from tagpipe_common.results import ResultStore
from tagpipe_common.subjects import Lane

from tests.integration.gateway_kit import pull_tasks
from tests.tools import eventually

pytestmark = pytest.mark.integration

NDJSON = {"Content-Type": "application/x-ndjson"}
# Ask again rather than sleep a fixed time; generous for a busy 2-core machine.
WAIT_S = 60.0


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    config = StackConfig(
        data_dir=tmp_path / "stack",
        downloaders=0,
        inference=0,
        fresh=True,
        gateway_env={"TAGPIPE_RECOVER_INTERVAL_S": "0.5"},
    )
    with Stack(config) as s:
        yield s


async def until(check: Any, what: str) -> Any:
    """`eventually` every 50 ms for up to WAIT_S, saying what never happened."""
    try:
        return await eventually(check, within=WAIT_S, every=0.05)
    except AssertionError as exc:
        raise AssertionError(f"never: {what} ({exc})") from None


def lines(n: int, tag: str) -> list[bytes]:
    return [
        json.dumps({"url": f"http://127.0.0.1:9/{tag}-{i}.jpg", "id": f"{tag}-{i}"}).encode()
        + b"\n"
        for i in range(n)
    ]


def exited_cleanly(svc: Service) -> None:
    assert svc.wait(WAIT_S), f"{svc.name} ignored SIGTERM"
    assert svc.proc is not None
    code = svc.proc.returncode
    # uvicorn >= 0.29 re-raises the signal once its shutdown is complete.
    log = svc.log_path.read_text(errors="replace")
    assert code == 0 or (code == -signal.SIGTERM and "Application shutdown complete" in log), (
        code,
        log[-3000:],
    )


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    client = Redis.from_url(stack.redis_url)
    yield client
    await client.aclose()


async def record_results(stack: Stack, redis: Redis, tasks: list[Any]) -> None:
    """What a downloader does for a URL that does not answer: one error result each."""
    store = ResultStore(redis, RedisKeys(stack.config.prefix), ttl_s=600)
    for task in tasks:
        await store.record(TagResult.error(task, "fetch_failed", "connection refused"))


async def test_an_upload_in_progress_at_sigterm_is_finished(stack: Stack) -> None:
    gateway = stack.service("gateway")
    body = lines(200, "up")
    rest_may_go = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"".join(body[:100])
        await rest_may_go.wait()  # the second half only after SIGTERM
        yield b"".join(body[100:])

    nc = await connect_nats([stack.nats_url], "test-drain")
    try:
        js = nc.jetstream()
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=WAIT_S) as http:
            upload = asyncio.create_task(http.post("/v1/jobs", content=slow_body(), headers=NDJSON))
            # The upload is in flight, and the operator's reader sees it in the report.
            await until(
                lambda: _at_least(read_in_flight(js, stack.config.prefix), 1),
                "a load report with the upload in flight",
            )
            gateway.signal(signal.SIGTERM)
            # The rest goes only once the gateway is shutting down (it refuses new
            # connections): an upload it did not wait for would be cut here.
            await until(lambda: _refuses(stack.gateway_url), "the gateway refusing connections")
            rest_may_go.set()
            response = await upload
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        await asyncio.to_thread(exited_cleanly, gateway)
        # Its clean exit removed its load report: the operator reads "no gateway", not 1.
        assert await read_in_flight(js, stack.config.prefix) is None
        kv = await js.key_value(bucket_name(stack.config.prefix))
        assert [k async for k in _keys(kv)] == []
    finally:
        await close_nats(nc)

    gateway.start()
    stack.wait_ready()
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=WAIT_S) as http:

        async def all_submitted() -> dict[str, Any] | None:
            status: dict[str, Any] = (await http.get(f"/v1/jobs/{job_id}")).json()
            return status if status.get("submitted") == len(body) else None

        status = await until(all_submitted, "every uploaded item submitted")
    assert status["total"] == len(body)


async def _keys(kv: Any) -> AsyncIterator[str]:
    try:
        for key in await kv.keys():
            yield key
    except NoKeysError:
        return


async def test_a_follow_stream_at_sigterm_ends_cleanly_and_resumes_elsewhere(
    stack: Stack, redis: Redis
) -> None:
    gateway = stack.service("gateway")
    nc = await connect_nats([stack.nats_url], "test-drain")
    try:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=WAIT_S) as http:
            created = await http.post("/v1/jobs", content=b"".join(lines(4, "fo")), headers=NDJSON)
            assert created.status_code == 202, created.text
            job_id = created.json()["job_id"]
            tasks = await pull_tasks(nc.jetstream(), Lane.BULK, 4)
            await record_results(stack, redis, tasks[:2])
            got: list[dict[str, Any]] = []
            # follow=600: without the drain this stream would outlive the gateway's
            # graceful timeout and be cut mid-response (an httpx protocol error here).
            url = f"/v1/jobs/{job_id}/results?follow=600"
            async with http.stream("GET", url) as stream:
                async for line in stream.aiter_lines():
                    got.append(json.loads(line))
                    if len(got) == 2:
                        gateway.signal(signal.SIGTERM)
            # The loop ended: the response finished cleanly, every line whole.
        assert [g["item_id"] for g in got] == [t.item_id for t in tasks[:2]]
        await asyncio.to_thread(exited_cleanly, gateway)

        gateway.start()
        stack.wait_ready()
        await record_results(stack, redis, tasks[2:])
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=WAIT_S) as http:
            cursor = got[-1]["cursor"]
            rest = await http.get(f"/v1/jobs/{job_id}/results?follow=600&cursor={cursor}")
        resumed = [json.loads(x) for x in rest.text.splitlines()]
        assert [r["item_id"] for r in resumed] == [t.item_id for t in tasks[2:]]
    finally:
        await close_nats(nc)


def second_gateway(stack: Stack, tmp_path: Path) -> Service:
    port = free_port()
    env = {**stack.base_env, "TAGPIPE_PORT": str(port), "TAGPIPE_HOST": "127.0.0.1"}
    env["TAGPIPE_RECOVER_INTERVAL_S"] = "0.5"
    url = f"http://127.0.0.1:{port}"
    svc = Service("gateway-b", [find_binary("tagpipe-gateway")], env, tmp_path / "b.log", url)
    svc.start()
    return svc


async def items_counted(http: httpx.AsyncClient) -> int:
    """tagpipe_gateway_items_total summed over its labels: the results this gateway tailed."""
    text = (await http.get("/metrics")).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tagpipe_gateway_items_total{")
        )
    )


async def test_a_tailed_job_at_sigterm_is_handed_to_another_gateway(
    stack: Stack, redis: Redis, tmp_path: Path
) -> None:
    a = stack.service("gateway")
    b = second_gateway(stack, tmp_path)
    keys = RedisKeys(stack.config.prefix)
    nc = await connect_nats([stack.nats_url], "test-drain")
    try:
        async with (
            httpx.AsyncClient(base_url=stack.gateway_url, timeout=WAIT_S) as http_a,
            httpx.AsyncClient(base_url=b.health_url or "", timeout=WAIT_S) as http_b,
        ):
            await until(lambda: _ready(http_b), "gateway B ready")
            created = await http_a.post(
                "/v1/jobs", content=b"".join(lines(3, "ta")), headers=NDJSON
            )
            job_id = created.json()["job_id"]
            tasks = await pull_tasks(nc.jetstream(), Lane.BULK, 3)
            await record_results(stack, redis, tasks[:1])
            # A submitted the job and tails it: it has counted the first result.
            await until(lambda: _equals(items_counted(http_a), 1), "A tailed the first result")
            a.signal(signal.SIGTERM)
            await asyncio.to_thread(exited_cleanly, a)
            handed = await redis.hget(keys.job(job_id), K.JOB_TAIL_CURSOR)
            assert handed is not None, "A left no cursor for the next gateway"

            await record_results(stack, redis, tasks[1:])
            # B took the tail over: it counts the two later results, not the first again,
            # and ends the job's tail (its URL list deleted, its result stream given a TTL).
            await until(lambda: _equals(items_counted(http_b), 2), "B tailed the rest")
            await until(lambda: _tail_ended(redis, keys, job_id), "B ended the job's tail")
            assert await items_counted(http_b) == 2
            assert not await redis.sismember(keys.submitting_jobs, job_id)
    finally:
        await close_nats(nc)
        b.signal(signal.SIGTERM)
        b.wait(WAIT_S)


async def _ready(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def _refuses(url: str) -> bool:
    """A new request is not served: refused, or (a connection the kernel accepted into
    the listen backlog as uvicorn closed its socket) closed without an answer."""
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:
            await fresh.get("/healthz")
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return True
    return False


async def _at_least(value: Any, least: int) -> bool:
    got = await value
    return got is not None and got >= least


async def _equals(value: Any, want: Any) -> bool:
    return bool(await value == want)


async def _tail_ended(redis: Redis, keys: RedisKeys, job_id: str) -> bool:
    gone = not await redis.exists(keys.job_urls(job_id))
    return gone and await redis.ttl(keys.job_results(job_id)) > 0
