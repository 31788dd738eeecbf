"""Completion webhooks against a real local receiver: retries, signature, event id,
giving up, and the SSRF guard at submission and again at send time.

The gateway in-process against real NATS and Redis; the test plays the workers
through the real queue and ResultStore, and receives the webhook with aiohttp.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from aiohttp import web
from nats.js.client import JetStreamContext
from redis.asyncio import Redis
from tagpipe_cli.servers import ServerProcess, free_port
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import DownloadTask, Tag, TagResult
from tagpipe_common.results import ResultStore
from tagpipe_common.subjects import Lane
from tagpipe_gateway.webhook import verify

from tests.integration.gateway_kit import gateway_client, pull_tasks, wait_status
from tests.tools import eventually

pytestmark = pytest.mark.integration

SECRET = "whsec-test-0123456789"
FAST = {
    "backlog_cache_s": 0,
    "bulk_batch_size": 4,
    "webhook_secret": SECRET,
    "webhook_poll_s": 0.2,
    "webhook_tick_s": 0.05,
    "webhook_backoff_base_s": 0.2,
    "webhook_timeout_s": 2.0,
}


@dataclass
class Receiver:
    """Answers 500 to the first `fail_first` deliveries, then 200; keeps each one."""

    fail_first: int = 0
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        return web.Response(status=500 if len(self.got) <= self.fail_first else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(fail_first=2)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rec.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield rec
    finally:
        await runner.cleanup()


@pytest.fixture
async def client(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> AsyncIterator[httpx.AsyncClient]:
    settings = {**FAST, "allow_cidrs": "127.0.0.0/8"}
    async with gateway_client(nats_proc, redis_proc, ["hook-key-0123"], **settings) as c:
        yield c


def ok(task: DownloadTask) -> TagResult:
    return TagResult(**task.ref(), status="ok", tags=[Tag(label="tabby", score=0.9)])


async def finish_job(
    c: httpx.AsyncClient, js: JetStreamContext, store: ResultStore, notify_url: str
) -> str:
    """A one-item job with `notify_url`, completed by playing the worker."""
    r = await c.post(
        "/v1/jobs", json=["http://img.example/a.jpg"], params={"notify_url": notify_url}
    )
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    await wait_status(c, job_id, submitted=1)
    (task,) = await pull_tasks(js, Lane.BULK, 1)
    await store.record(ok(task))
    return job_id


async def notify_of(c: httpx.AsyncClient, job_id: str, state: str) -> dict[str, Any]:
    async def settled() -> dict[str, Any] | None:
        notify: dict[str, Any] = (await c.get(f"/v1/jobs/{job_id}")).json()["notify"]
        return notify if notify["state"] == state else None

    found: dict[str, Any] = await eventually(settled, within=30)
    return found


async def test_the_third_attempt_delivers_a_signed_event_with_a_stable_id(
    client: httpx.AsyncClient, js: JetStreamContext, store: ResultStore, receiver: Receiver
) -> None:
    job_id = await finish_job(client, js, store, receiver.url)
    notify = await notify_of(client, job_id, "delivered")
    assert notify["attempts"] == 3 and notify["delivered_at"] is not None
    assert len(receiver.got) == 3  # two 500s, then the 200; nothing after it

    ids = {h["Tagpipe-Event-Id"] for h, _ in receiver.got}
    bodies = {body for _, body in receiver.got}
    assert ids == {f"evt-{job_id}-completed"} and len(bodies) == 1  # the same event, resent
    assert [h["Tagpipe-Delivery-Attempt"] for h, _ in receiver.got] == ["1", "2", "3"]
    headers, body = receiver.got[-1]
    assert verify(SECRET.encode(), headers["Tagpipe-Signature"], body)
    assert not verify(b"another-secret", headers["Tagpipe-Signature"], body)
    assert not verify(SECRET.encode(), headers["Tagpipe-Signature"], body + b" ")
    event = json.loads(body)
    assert event["event_id"] == headers["Tagpipe-Event-Id"] and event["type"] == "job.completed"
    assert event["job"]["job_id"] == job_id and event["job"]["state"] == "completed"
    assert event["job"]["done"] == 1 and event["job"]["notify"] is None


async def test_a_cancelled_job_notifies_at_once(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.fail_first = 0
    urls = [f"http://img.example/{i}.jpg" for i in range(8)]
    r = await client.post("/v1/jobs", json=urls, params={"notify_url": receiver.url})
    job_id = r.json()["job_id"]
    await client.delete(f"/v1/jobs/{job_id}")
    await notify_of(client, job_id, "delivered")
    event = json.loads(receiver.got[0][1])
    assert event["type"] == "job.cancelled"
    job = event["job"]
    assert job["state"] == "cancelled" and job["cancelled"] == 8 and job["finished"] == 8


async def test_another_gateway_delivers_when_the_first_is_gone(
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    js: JetStreamContext,
    store: ResultStore,
    redis: Redis,
    receiver: Receiver,
) -> None:
    receiver.fail_first = 0
    settings = {**FAST, "allow_cidrs": "127.0.0.0/8"}
    async with gateway_client(nats_proc, redis_proc, ["hook-key-0123"], **settings) as first:
        r = await first.post(
            "/v1/jobs", json=["http://img.example/a.jpg"], params={"notify_url": receiver.url}
        )
        job_id = r.json()["job_id"]
        await wait_status(first, job_id, submitted=1)
        # A claim this gateway will never finish: it dies holding the job for 1 s.
        await redis.zadd(RedisKeys().notify_due, {job_id: time.time() + 1.0})
    (task,) = await pull_tasks(js, Lane.BULK, 1)
    await store.record(ok(task))  # the job ends with no gateway running
    async with gateway_client(nats_proc, redis_proc, ["hook-key-0123"], **settings) as second:
        notify = await notify_of(second, job_id, "delivered")
    assert notify["attempts"] == 1 and len(receiver.got) == 1


async def test_an_https_receiver_is_dialled_at_its_vetted_address_under_its_name(
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    js: JetStreamContext,
    store: ResultStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS to `localhost` (the name the certificate holds) at the address the guard
    vetted, whichever of ::1 and 127.0.0.1 comes first; the CA from SSL_CERT_FILE."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(tls)
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    settings = {**FAST, "allow_cidrs": "127.0.0.0/8,::1/128"}
    try:
        async with gateway_client(nats_proc, redis_proc, ["hook-key-0123"], **settings) as c:
            job_id = await finish_job(c, js, store, f"https://localhost:{port}/hook")
            notify = await notify_of(c, job_id, "delivered")
    finally:
        await runner.cleanup()
    assert notify["attempts"] == 1
    ((headers, body),) = rec.got
    assert headers["Host"] == f"localhost:{port}"
    assert verify(SECRET.encode(), headers["Tagpipe-Signature"], body)


async def test_retries_end_after_the_give_up_time_and_the_job_says_so(
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    js: JetStreamContext,
    store: ResultStore,
    receiver: Receiver,
) -> None:
    receiver.fail_first = 1000
    settings = {**FAST, "allow_cidrs": "127.0.0.0/8", "webhook_give_up_s": 1.0}
    async with gateway_client(nats_proc, redis_proc, ["hook-key-0123"], **settings) as c:
        job_id = await finish_job(c, js, store, receiver.url)
        notify = await notify_of(c, job_id, "failed")
    assert notify["attempts"] == len(receiver.got) >= 2
    assert notify["last_error"] == "HTTP 500"


async def test_a_private_notify_url_is_refused_at_submission_and_at_send_time(
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    js: JetStreamContext,
    store: ResultStore,
    redis: Redis,
    receiver: Receiver,
) -> None:
    async with gateway_client(nats_proc, redis_proc, ["hook-key-0123"], **FAST) as c:
        for url, why in [
            (receiver.url, "blocked_address"),  # 127.0.0.1 and no allowlist
            ("http://[::ffff:10.0.0.1]/hook", "blocked_address"),
            ("ftp://hooks.example.com/x", "invalid_url"),
            ("http://user:pw@hooks.example.com/x", "invalid_url"),
        ]:
            r = await c.post("/v1/jobs", json=["http://a.example/1"], params={"notify_url": url})
            assert r.status_code == 422, (url, r.text)
            error = r.json()["errors"][0]
            assert error["field"] == "query.notify_url" and why in error["message"], url

        # A job whose URL passed once (say, before its DNS changed) is checked again at
        # send time, after a fresh lookup: localhost resolves to a loopback address.
        r = await c.post(
            "/v1/jobs",
            json=["http://img.example/a.jpg"],
            params={"notify_url": "https://hooks.example.com/x"},
        )
        job_id = r.json()["job_id"]
        rebound = receiver.url.replace("127.0.0.1", "localhost")
        await redis.hset(RedisKeys().job(job_id), "notify_url", rebound)  # type: ignore[misc]
        await wait_status(c, job_id, submitted=1)
        (task,) = await pull_tasks(js, Lane.BULK, 1)
        await store.record(ok(task))
        notify = await notify_of(c, job_id, "failed")
    assert notify["attempts"] == 1 and "blocked_address" in notify["last_error"]
    assert receiver.got == []  # never dialled
