"""POST /v1/manifest-jobs against real servers: NATS JetStream, Redis, a moto S3 server
(auth on) and a local HTTPS server.

No downloader runs: the test plays it, pulling the published download tasks, so what
is checked is the reader's side: each manifest line published once, with its seq,
under the bulk backpressure, resumable by another gateway; the job hash's fields;
the refusals at the door; nothing of the item list left in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from nats.js.client import JetStreamContext
from redis.asyncio import Redis
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import DownloadTask
from tagpipe_common.subjects import Lane

from tests.integration.gateway_kit import gateway_client, pull_tasks, wait_status
from tests.s3kit import moto_s3, s3_client

__all__ = ["moto_s3"]  # the fixture, imported for pytest

pytestmark = pytest.mark.integration

KEY = "manifest-key-123"
KEYS = RedisKeys()


@pytest.fixture
def s3(moto_s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 client of the moto store; the gateway's env points at it too."""
    for k, v in moto_s3.items():
        monkeypatch.setenv(k, v)
    client = s3_client(moto_s3)
    have = {b["Name"] for b in client.list_buckets()["Buckets"]}
    for bucket in ("src", "dst"):
        if bucket not in have:
            client.create_bucket(Bucket=bucket)
    return client


def gateway(
    nats_proc: ServerProcess, redis_proc: ServerProcess, **overrides: Any
) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
    fast = {"backlog_cache_s": 0, "bulk_batch_size": 4, "manifest_chunk_items": 5}
    return gateway_client(nats_proc, redis_proc, [KEY], **{**fast, **overrides})


@pytest.fixture
async def client(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext, s3: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway(nats_proc, redis_proc) as c:
        yield c


def urls(n: int, tag: str = "a") -> list[str]:
    return [f"https://images.example.com/{tag}/{i}.jpg" for i in range(n)]


async def submit(c: httpx.AsyncClient, source: str, **body: Any) -> str:
    r = await c.post("/v1/manifest-jobs", json={"source": source, "output": "s3://dst/r/", **body})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["total"] is None and job["status_url"] == f"/v1/jobs/{job['job_id']}"
    return str(job["job_id"])


async def no_more_tasks(js: JetStreamContext) -> None:
    with pytest.raises((asyncio.TimeoutError, TimeoutError)):
        await pull_tasks(js, Lane.BULK, 1)


def by_seq(tasks: list[DownloadTask]) -> dict[int, DownloadTask]:
    seqs = [t.seq for t in tasks if t.seq is not None]
    assert len(seqs) == len(tasks) == len(set(seqs)), f"a seq twice or none: {sorted(seqs)}"
    return {t.seq: t for t in tasks if t.seq is not None}


async def test_a_jsonl_manifest_publishes_each_line_once_with_its_seq(
    client: httpx.AsyncClient, js: JetStreamContext, redis: Redis, s3: Any
) -> None:
    good = urls(9)
    lines = [json.dumps({"url": u, "id": f"sku-{i}"}) for i, u in enumerate(good)]
    lines.insert(3, "{not json")  # seq 3: malformed, becomes invalid_url
    lines.insert(6, json.dumps({"url": good[0]}))  # seq 6: the URL of seq 0 again
    lines.insert(8, "")  # blank: not an item
    s3.put_object(Bucket="src", Key="m.jsonl", Body=("\n".join(lines) + "\n").encode())
    job_id = await submit(client, "s3://src/m.jsonl")

    status = await wait_status(client, job_id, total=11, state="running", submitted=11)
    tasks = by_seq(await pull_tasks(js, Lane.BULK, 9))
    await no_more_tasks(js)
    assert sorted(tasks) == [0, 1, 2, 4, 5, 7, 8, 9, 10]
    assert all(t.item_id == f"{job_id}-n{s}" and t.job_id == job_id for s, t in tasks.items())
    assert [tasks[s].client_item_id for s in (0, 4, 10)] == ["sku-0", "sku-3", "sku-8"]
    assert status["failed"] == 2  # the malformed line and the duplicate URL, as results

    raw: dict[bytes, bytes] = await redis.hgetall(KEYS.job(job_id))  # type: ignore[misc]
    h = {k.decode(): v.decode() for k, v in raw.items()}
    assert (h["kind"], h["source"], h["output"], h["shard_size"]) == (
        "manifest",
        "s3://src/m.jsonl",
        "s3://dst/r/",
        "1000",
    )
    # No copy of the item list in Redis: no items stream, no URL marks.
    keys = {k.decode() async for k in redis.scan_iter(f"*{job_id}*")}
    assert KEYS.job_items(job_id) not in keys and KEYS.job_urls(job_id) not in keys
    for key in keys:
        if (await redis.type(key)) == b"string":
            assert good[5].encode() not in await redis.get(key), key


async def test_text_and_multi_member_gzip_manifests(
    client: httpx.AsyncClient, js: JetStreamContext, s3: Any
) -> None:
    text = "\n".join(urls(4, "t")) + "\n"  # plain text, one URL a line
    s3.put_object(Bucket="src", Key="list.txt", Body=text.encode())
    first, second = "\n".join(urls(3, "g")) + "\n", "\n".join(urls(4, "h"))  # no final newline
    s3.put_object(
        Bucket="src",
        Key="list.gz",
        Body=gzip.compress(first.encode()) + gzip.compress(second.encode()),
    )
    text_job = await submit(client, "s3://src/list.txt")
    gz_job = await submit(client, "s3://src/list.gz")
    await wait_status(client, text_job, total=4, state="running")
    await wait_status(client, gz_job, total=7, state="running")
    tasks = await pull_tasks(js, Lane.BULK, 11)
    await no_more_tasks(js)
    gz = by_seq([t for t in tasks if t.job_id == gz_job])
    assert [gz[s].url for s in range(7)] == urls(3, "g") + urls(4, "h")
    assert sorted(by_seq([t for t in tasks if t.job_id == text_job])) == [0, 1, 2, 3]


@pytest.fixture
def https_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(base URL, served directory) of a local HTTPS server the gateway trusts."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    served = tmp_path / "www"
    served.mkdir()
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(served))
    )
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


async def test_an_https_source_on_an_allowlisted_address(
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    js: JetStreamContext,
    s3: Any,
    https_manifest: tuple[str, Path],
) -> None:
    base, served = https_manifest
    (served / "m.jsonl").write_text("".join(json.dumps({"url": u}) + "\n" for u in urls(6)))
    async with gateway(nats_proc, redis_proc) as refused:
        r = await refused.post(
            "/v1/manifest-jobs", json={"source": f"{base}/m.jsonl", "output": "s3://dst/x/"}
        )
        assert r.status_code == 422 and r.json()["code"] == "blocked_address", r.text
    async with gateway(nats_proc, redis_proc, allow_cidrs="127.0.0.0/8") as c:
        job_id = await submit(c, f"{base}/m.jsonl")
        await wait_status(c, job_id, total=6, state="running")
    assert sorted(by_seq(await pull_tasks(js, Lane.BULK, 6))) == list(range(6))


async def test_bad_requests_are_problems_and_leave_no_job(
    client: httpx.AsyncClient, redis: Redis, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put_object(Bucket="src", Key="ok.txt", Body=b"https://images.example.com/1.jpg\n")
    s3.put_object(Bucket="src", Key="fake.gz", Body=b"https://images.example.com/1.jpg\n")
    cases = [
        ({"source": "s3://src/nothing.txt"}, "source_not_found"),
        ({"source": "s3://src/fake.gz"}, "source_unreadable"),
        ({"output": "s3://no-such-bucket/r/"}, "output_not_writable"),
        ({"notify_url": "http://10.1.2.3/hook"}, "validation_error"),
        ({"notify_url": "http://169.254.169.254/latest"}, "validation_error"),
        ({"source": "ftp://in/ok.txt"}, "validation_error"),
        ({"output": "https://out.example.com/r/"}, "validation_error"),
    ]
    for change, code in cases:
        body = {"source": "s3://src/ok.txt", "output": "s3://dst/r/", **change}
        r = await client.post("/v1/manifest-jobs", json=body)
        assert r.status_code == 422, (change, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == code, (change, r.json())
        if "notify_url" in change:
            assert r.json()["errors"][0]["field"] == "body.notify_url"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    r = await client.post(
        "/v1/manifest-jobs", json={"source": "s3://src/ok.txt", "output": "s3://dst/r/"}
    )
    assert r.status_code == 422 and r.json()["code"] == "source_denied", r.text
    assert [k async for k in redis.scan_iter(KEYS.job("*"))] == []


async def test_the_idempotency_key_returns_the_same_manifest_job(
    client: httpx.AsyncClient, s3: Any
) -> None:
    s3.put_object(Bucket="src", Key="idem.txt", Body=b"https://images.example.com/1.jpg\n")
    body = {"source": "s3://src/idem.txt", "output": "s3://dst/i/"}
    first = await client.post("/v1/manifest-jobs", json=body, headers={"Idempotency-Key": "k1"})
    again = await client.post("/v1/manifest-jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202 and again.status_code == 200, again.text
    assert again.json()["job_id"] == first.json()["job_id"] and again.json()["reused"]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
async def test_a_reader_that_loses_its_lease_is_resumed_by_another_gateway(
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    js: JetStreamContext,
    redis: Redis,
    s3: Any,
    compressed: bool,
) -> None:
    n = 40
    body = (
        "\n".join(json.dumps({"url": u, "id": str(i)}) for i, u in enumerate(urls(n))) + "\n"
    ).encode()
    key = "big.jsonl.gz" if compressed else "big.jsonl"
    s3.put_object(Bucket="src", Key=key, Body=gzip.compress(body) if compressed else body)
    # Backpressure holds the first reader after ~10 items (nobody consumes yet).
    paced = {"bulk_backlog_limit": 8, "realtime_backlog_limit": 8, "lease_s": 2}
    async with gateway(nats_proc, redis_proc, **paced) as first:
        job_id = await submit(first, f"s3://src/{key}")
        held = await wait_status(first, job_id, state="submitting")
        for _ in range(200):
            held = (await first.get(f"/v1/jobs/{job_id}")).json()
            if held["submitted"] >= 5:
                break
            await asyncio.sleep(0.05)
        assert 5 <= held["submitted"] < n, held
        # The reader stalls past its lease: another gateway takes the job over.
        await redis.delete(KEYS.job_lease(job_id))
        async with gateway(nats_proc, redis_proc, **paced, recover_interval_s=0.2) as second:
            tasks: list[DownloadTask] = []
            while len(tasks) < n:  # play the downloader, so the backlog drains
                tasks += await pull_tasks(js, Lane.BULK, 1)
            await wait_status(second, job_id, total=n, state="running", submitted=n)
            await no_more_tasks(js)
    seqs = by_seq(tasks)
    assert sorted(seqs) == list(range(n))
    assert all(seqs[s].client_item_id == str(s) for s in seqs)


async def test_a_manifest_that_breaks_mid_read_ends_the_job_with_a_reason(
    client: httpx.AsyncClient, js: JetStreamContext, redis: Redis, s3: Any
) -> None:
    whole = gzip.compress(("\n".join(urls(12, "b")) + "\n").encode())
    s3.put_object(Bucket="src", Key="cut.gz", Body=whole[:-8])  # its trailer cut off
    job_id = await submit(client, "s3://src/cut.gz")
    # Chunks of 5: the third holds lines 10 and 11, then the break; those two are items.
    await wait_status(client, job_id, total=13, state="running", failed=1)
    assert sorted(by_seq(await pull_tasks(js, Lane.BULK, 12))) == list(range(12))
    staged = await redis.hget(KEYS.job_shard(job_id, 0), "12")  # type: ignore[misc]
    line = json.loads(staged)
    assert line["status"] == "error" and line["code"] == "manifest_unreadable", line
    assert "truncated" in line["message"]


async def test_a_cancelled_manifest_job_stops_reading(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext, redis: Redis,
    s3: Any,
) -> None:  # fmt: skip
    s3.put_object(Bucket="src", Key="long.txt", Body=("\n".join(urls(200, "c"))).encode())
    paced = {"bulk_backlog_limit": 8, "realtime_backlog_limit": 8}
    async with gateway(nats_proc, redis_proc, **paced) as c:
        job_id = await submit(c, "s3://src/long.txt")
        for _ in range(200):
            if (await c.get(f"/v1/jobs/{job_id}")).json()["submitted"] >= 5:
                break
            await asyncio.sleep(0.05)
        assert (await c.delete(f"/v1/jobs/{job_id}")).json()["state"] == "cancelled"
        for _ in range(200):  # the reader notices at its next chunk and stops
            if not await redis.sismember(KEYS.submitting_jobs, job_id):  # type: ignore[misc]
                break
            await asyncio.sleep(0.05)
        total = int(await redis.hget(KEYS.job(job_id), "total"))  # type: ignore[misc]
        assert 5 <= total < 200
        # The sink writes its _manifest.json after the redelivery window, results or not.
        assert await redis.sismember(KEYS.sinking_jobs, job_id)  # type: ignore[misc]
        assert len(by_seq(await pull_tasks(js, Lane.BULK, total))) == total
        await no_more_tasks(js)


async def test_an_empty_manifest_completes_with_an_empty_output(
    client: httpx.AsyncClient, s3: Any
) -> None:
    s3.put_object(Bucket="src", Key="empty.txt", Body=b"\n\n")
    body = {"source": "s3://src/empty.txt", "output": "s3://dst/empty"}
    r = await client.post("/v1/manifest-jobs", json=body)
    assert r.status_code == 202, r.text
    status = await wait_status(client, r.json()["job_id"], state="completed")
    assert (status["total"], status["finished"]) == (0, 0)
    summary = json.loads(s3.get_object(Bucket="dst", Key="empty/_manifest.json")["Body"].read())
    assert (summary["total"], summary["shards"]) == (0, [])
