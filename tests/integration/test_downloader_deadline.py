"""The per-item download deadline: one wall-clock bound over every attempt of an
item (headers and body, whatever the pace of reads), kept across redeliveries
in real Redis. The worker-level cases (trickle, stall, endless body through
JetStream) are in test_hostile_inputs.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from tagpipe_common.errors import PermanentError
from tagpipe_common.keys import RedisKeys
from tagpipe_downloader.deadline import ItemDeadlines
from tagpipe_downloader.fetch import FetchConfig, Fetcher
from tagpipe_downloader.guard import parse_cidrs
from tagpipe_downloader.settings import DownloaderSettings
from tagpipe_downloader.worker import redelivery_window_s

from bench.imageserver import ImageServer, make_jpeg

pytestmark = pytest.mark.integration

ALLOW = parse_cidrs(["127.0.0.2/32"])
# A per-attempt bound no test can reach: only the item deadline can end these fetches.
NEVER = 3600.0
HANG_S = 60.0  # a hang guard for a loaded runner, no speed claim


@pytest.fixture
async def images() -> AsyncIterator[ImageServer]:
    async with ImageServer(host="127.0.0.2") as srv:
        yield srv


def config(**kw: object) -> FetchConfig:
    base: dict[str, object] = {
        "allow": ALLOW,
        "total_timeout_s": NEVER,
        "read_timeout_s": NEVER,
        "retries": 2,
        "item_deadline_s": 1.0,
    }
    return FetchConfig(**(base | kw))  # type: ignore[arg-type]


async def test_slow_response_ends_at_the_item_deadline_as_a_final_timeout(
    images: ImageServer,
) -> None:
    images.add("x", make_jpeg(32, 32))
    async with Fetcher(config()) as f:
        with pytest.raises(PermanentError) as info:
            await asyncio.wait_for(f.fetch(images.url("/slow?delay_s=600&name=x")), HANG_S)
    assert info.value.code == "download_timeout" and "deadline" in info.value.message
    assert len(images.hits["/slow"]) == 1  # the deadline ended it: no second attempt


async def test_a_deadline_already_past_makes_no_connection(images: ImageServer) -> None:
    url = images.add("x", make_jpeg(32, 32))
    async with Fetcher(config()) as f:
        with pytest.raises(PermanentError) as info:
            await f.fetch(url, deadline=time.time() - 1)
    assert info.value.code == "download_timeout"
    assert not images.hits


async def test_a_retry_that_would_start_after_the_deadline_is_final(
    images: ImageServer,
) -> None:
    # Retry-After 30 s would go back to JetStream; the deadline is 1 s away.
    async with Fetcher(config()) as f:
        with pytest.raises(PermanentError) as info:
            await f.fetch(images.url("/status/503?retry_after=30"))
    assert info.value.code == "http_503" and "deadline" in info.value.message


async def test_inline_retries_go_on_while_the_deadline_allows(images: ImageServer) -> None:
    images.add("ok", make_jpeg(32, 32))
    async with Fetcher(config(item_deadline_s=NEVER, backoff_base_s=0.01)) as f:
        result = await f.fetch(images.url("/flaky/k/2/503?name=ok"))
    assert result.attempts == 3


async def test_first_delivery_reads_nothing_and_later_ones_share_the_kept_deadline(
    redis: Redis,
) -> None:
    deadlines = ItemDeadlines(redis, RedisKeys(), budget_s=100.0)
    first = await deadlines.deadline("a", delivery=1)
    assert await redis.exists(RedisKeys().fetch_deadline("a")) == 0
    await deadlines.keep("a", first)
    assert await deadlines.deadline("a", delivery=2) == first
    assert await deadlines.deadline("a", delivery=5) == first
    await deadlines.keep("a", first + 50)  # SET NX: the first deadline stored wins
    assert await deadlines.deadline("a", delivery=3) == first


async def test_a_redelivery_with_nothing_kept_starts_one_deadline_for_the_rest(
    redis: Redis,
) -> None:
    # The worker of delivery 1 died before keeping anything: delivery 2 starts
    # the clock, and every later delivery goes on with that one.
    deadlines = ItemDeadlines(redis, RedisKeys(), budget_s=100.0)
    second = await deadlines.deadline("b", delivery=2)
    await asyncio.sleep(0.01)
    assert await deadlines.deadline("b", delivery=3) == second
    ttl = await redis.ttl(RedisKeys().fetch_deadline("b"))
    assert ttl > 100  # outlives the deadline, to refuse late redeliveries


async def test_a_kept_deadline_expires_with_the_redelivery_window(redis: Redis) -> None:
    # No key per item outlives the item's deliveries (issue #29: nothing per item stays
    # in Redis once the redelivery window has passed).
    window = redelivery_window_s(DownloaderSettings(max_deliver=3, transient_nak_delay_s=1.0))
    assert window == 3 * 60.0  # the download ack wait (60 s) and Retry-After cap (60 s)
    deadlines = ItemDeadlines(redis, RedisKeys(), budget_s=100.0, keep_after_s=window)
    await deadlines.keep("c", await deadlines.deadline("c", delivery=2))
    assert 100 < await redis.ttl(RedisKeys().fetch_deadline("c")) <= 100 + window + 1
