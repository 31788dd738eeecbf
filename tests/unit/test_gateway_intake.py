"""Streaming job intake: any chunking of the body gives the same items."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from tagpipe_gateway.intake import Spool, spool_json_array, spool_ndjson
from tagpipe_gateway.problems import ProblemError


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


class Sink:
    """Collects what the spool hands on, checking the batches are contiguous."""

    def __init__(self) -> None:
        self.items: list[list[str | None]] = []

    async def __call__(self, start: int, batch: list[list[str | None]]) -> None:
        assert start == len(self.items)
        self.items += batch


ITEMS = [
    "http://a.example/1.jpg",
    {"url": "http://a.example/é.jpg", "id": "x,1"},
    {"url": "https://b.example/2.png"},
]
EXPECTED = [
    ["http://a.example/1.jpg", None],
    ["http://a.example/é.jpg", "x,1"],
    ["https://b.example/2.png", None],
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
async def test_json_array_any_chunking(size: int) -> None:
    sink = Sink()
    spool = Spool(sink, 100, 4096, batch=2)
    data = (" [ " + " , ".join(json.dumps(i) for i in ITEMS) + " ] \n").encode()
    await spool_json_array(chunks(data, size), spool)
    assert spool.count == 3
    assert sink.items == EXPECTED


@pytest.mark.parametrize("size", [1, 5, 1000])
async def test_ndjson_any_chunking_with_bare_urls(size: int) -> None:
    sink = Sink()
    spool = Spool(sink, 100, 4096, batch=2)
    data = "\n".join(
        [ITEMS[0], json.dumps(ITEMS[1]), "", "# comment", json.dumps(ITEMS[2])]  # type: ignore[list-item]
    ).encode()
    await spool_ndjson(chunks(data, size), spool)
    assert sink.items == EXPECTED


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'["http://a/1.jpg" "http://a/2.jpg"]', "body[1]"),
        (b'{"url": "http://a/1.jpg"}', "body"),
        (b'["http://a/1.jpg"', "body"),
        (b'["http://a/1.jpg", {"url": 3}]', "body[1].url"),
        (b'["http://a/1.jpg"] []', "body"),
    ],
)
async def test_json_array_errors_name_the_element(body: bytes, field: str) -> None:
    spool = Spool(Sink(), 100, 4096)
    with pytest.raises(ProblemError) as err:
        await spool_json_array(chunks(body, 4), spool)
    assert err.value.status == 422
    assert err.value.extra["errors"][0]["field"] == field


async def test_item_limit_is_413() -> None:
    spool = Spool(Sink(), 2, 4096)
    with pytest.raises(ProblemError) as err:
        await spool_ndjson(chunks(b"http://a/1\nhttp://a/2\nhttp://a/3\n", 64), spool)
    assert err.value.status == 413
