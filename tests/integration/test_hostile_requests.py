"""Oversized and malformed requests against the gateway (in-process, real NATS and
Redis): each is a 4xx problem+json with a stable code, never a 5xx, and the
gateway stops reading a body as soon as it knows the answer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from nats.js.client import JetStreamContext
from tagpipe_cli.servers import ServerProcess

from tests.integration.gateway_kit import gateway_client

pytestmark = pytest.mark.integration

KEY = "hostile-key-1"
MIB = 1 << 20


@pytest.fixture
async def client(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> AsyncIterator[httpx.AsyncClient]:
    settings = {"max_upload_bytes": 64 * 1024, "realtime_timeout_s": 1.0}
    async with gateway_client(nats_proc, redis_proc, [KEY], **settings) as c:
        yield c


class Body:
    """A streamed request body that counts what the server actually pulled."""

    def __init__(self, head: bytes, filler: bytes, total: int, tail: bytes = b"") -> None:
        self.head, self.filler, self.total, self.tail = head, filler, total, tail
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        self.sent += len(self.head)
        chunk = self.filler * (64 * 1024 // len(self.filler))
        while self.sent < self.total:
            yield chunk
            self.sent += len(chunk)
        yield self.tail


def problem(r: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = r.json()
    assert body["code"] == code and body["status"] == status, body
    return body


async def test_huge_json_body_is_413_before_it_is_all_read(client: httpx.AsyncClient) -> None:
    body = Body(b'{"urls": ["http://example.com/', b"a", 64 * MIB, b'"]}')
    r = await client.post("/v1/tags", content=body, headers={"Content-Type": "application/json"})
    problem(r, 413, "payload_too_large")
    assert body.sent < 4 * MIB, f"read {body.sent} bytes of a body refused at 1 MiB"


async def test_too_many_urls_is_422_too_many_urls(client: httpx.AsyncClient) -> None:
    for n in (33, 5000):
        urls = [f"http://example.com/{i}.jpg" for i in range(n)]
        body = problem(await client.post("/v1/tags", json={"urls": urls}), 422, "too_many_urls")
        assert body["errors"] == [{"field": "body.urls", "message": "at most 32 items"}]


async def test_huge_upload_is_413(client: httpx.AsyncClient) -> None:
    body = Body(b"\xff\xd8\xff\xe0", b"\0", 32 * MIB)
    r = await client.post("/v1/tags", content=body, headers={"Content-Type": "image/jpeg"})
    problem(r, 413, "payload_too_large")
    assert body.sent < 4 * MIB


async def test_huge_ndjson_line_is_refused_without_buffering_it(client: httpx.AsyncClient) -> None:
    first = b'{"url": "http://example.com/a.jpg"}\n'
    body = Body(first + b'{"url": "http://example.com/', b"b", 64 * MIB, b'"}\n')
    r = await client.post(
        "/v1/jobs", content=body, headers={"Content-Type": "application/x-ndjson"}
    )
    err = problem(r, 422, "validation_error")
    assert err["errors"][0]["field"] == "line[2]", err  # type: ignore[index]
    assert body.sent < 4 * MIB, f"buffered {body.sent} bytes of one line"


async def test_huge_json_array_element_is_422(client: httpx.AsyncClient) -> None:
    body = Body(b'["http://example.com/', b"c", 64 * MIB, b'"]')
    r = await client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    err = problem(r, 422, "validation_error")
    assert err["errors"][0]["field"] == "body[0]", err  # type: ignore[index]
    assert body.sent < 4 * MIB


@pytest.mark.parametrize(
    ("path", "ctype", "payload"),
    [
        ("/v1/tags", "application/json", b'{"urls": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("/v1/jobs", "application/json", b"[" + b"[" * 100_000 + b"]" * 100_001),
        ("/v1/jobs", "application/x-ndjson", b'{"url": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ],
    ids=["tags-json", "jobs-array", "jobs-ndjson"],
)
async def test_deeply_nested_json_is_422_not_a_crash(
    client: httpx.AsyncClient, path: str, ctype: str, payload: bytes
) -> None:
    r = await client.post(path, content=payload, headers={"Content-Type": ctype})
    problem(r, 422, "validation_error")


@pytest.mark.parametrize(
    ("path", "ctype", "payload"),
    [
        ("/v1/tags", "application/json", b"\xff\xfe{not json"),
        ("/v1/tags", "application/json", json.dumps({"url": "http://x/" + "\udcff"}).encode()),
        ("/v1/jobs", "application/x-ndjson", b"\x00\x01\x02\n\xff\xfe\n"),
        ("/v1/jobs", "application/json", b'[{"url": 1e999999}]'),
        ("/v1/tags", "application/json", b'{"url": "http://x/a.jpg", "top_k": 1e400}'),
    ],
    ids=["binary-json", "lone-surrogate", "binary-ndjson", "huge-number", "inf-top-k"],
)
async def test_garbage_is_422(
    client: httpx.AsyncClient, path: str, ctype: str, payload: bytes
) -> None:
    r = await client.post(path, content=payload, headers={"Content-Type": ctype})
    problem(r, 422, "validation_error")


async def test_url_longer_than_the_limit_is_422(client: httpx.AsyncClient) -> None:
    url = "http://example.com/" + "d" * 10_000
    err = problem(await client.post("/v1/tags", json={"url": url}), 422, "validation_error")
    assert err["errors"][0]["field"] == "body.url", err  # type: ignore[index]
