"""The fetcher against a real local HTTP server: caps, redirects, retries, pinning."""

from __future__ import annotations

import ipaddress
import tracemalloc
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
from tagpipe_common.errors import PermanentError, RetryableError
from tagpipe_downloader.fetch import BlockedResolution, FetchConfig, Fetcher, PinnedResolver
from tagpipe_downloader.guard import parse_cidrs

from bench.imageserver import ImageServer, make_jpeg

ALLOW = parse_cidrs(["127.0.0.2/32"])


@pytest.fixture
async def images() -> AsyncIterator[ImageServer]:
    async with ImageServer(host="127.0.0.2") as srv:
        yield srv


def config(**kw: object) -> FetchConfig:
    base: dict[str, object] = {"allow": ALLOW, "total_timeout_s": 2.0, "retries": 1}
    return FetchConfig(**(base | kw))  # type: ignore[arg-type]


async def test_endless_body_stops_at_the_cap_with_bounded_memory(images: ImageServer) -> None:
    cap = 1024 * 1024
    async with Fetcher(config(max_bytes=cap)) as f:
        tracemalloc.start()
        try:
            with pytest.raises(PermanentError) as info:
                await f.fetch(images.url("/endless"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert info.value.code == "too_large"
    # The body buffer plus one read: a few caps at most, never the whole stream.
    assert peak < 4 * cap, peak


async def test_declared_length_over_the_cap_is_refused_before_reading(
    images: ImageServer,
) -> None:
    url = images.add("big", make_jpeg(1600, 1200))
    async with Fetcher(config(max_bytes=50_000)) as f:
        with pytest.raises(PermanentError) as info:
            await f.fetch(url)
    assert info.value.code == "too_large" and "Content-Length" in info.value.message


async def test_redirect_chain_longer_than_the_limit(images: ImageServer) -> None:
    url = images.add("x", make_jpeg(64, 64))
    for _ in range(4):
        url = images.url(f"/redirect?to={quote(url, safe='')}")
    async with Fetcher(config(max_redirects=4)) as f:
        assert (await f.fetch(url)).url.endswith("/img/x")  # 4 hops: allowed
    async with Fetcher(config(max_redirects=3)) as f:
        with pytest.raises(PermanentError) as info:
            await f.fetch(url)
    assert info.value.code == "too_many_redirects"


async def test_5xx_is_retried_inside_the_delivery(images: ImageServer) -> None:
    images.add("ok", make_jpeg(64, 64))
    async with Fetcher(config(retries=2, backoff_base_s=0.01)) as f:
        result = await f.fetch(images.url("/flaky/k503/2/503?name=ok"))
    assert result.attempts == 3 and result.body.startswith(b"\xff\xd8")


async def test_long_retry_after_goes_back_to_jetstream(images: ImageServer) -> None:
    async with Fetcher(config(retry_after_inline_max_s=2.0, retry_after_max_s=60.0)) as f:
        with pytest.raises(RetryableError) as info:
            await f.fetch(images.url("/status/503?retry_after=30"))
        assert (info.value.code, info.value.delay_s) == ("http_503", 30.0)
        with pytest.raises(RetryableError) as info:
            await f.fetch(images.url("/status/429?retry_after=9999"))
        assert (info.value.code, info.value.delay_s) == ("http_429", 60.0)  # capped
    assert len(images.hits["/status/503"]) == 1  # no pointless inline retry


async def test_hostname_resolving_to_loopback_is_blocked(images: ImageServer) -> None:
    async with Fetcher(config()) as f:
        with pytest.raises(PermanentError) as info:
            await f.fetch(f"http://localhost:{images.port}/img/x")
    assert info.value.code == "blocked_address"


async def test_resolver_dials_only_vetted_addresses() -> None:
    resolver = PinnedResolver(ALLOW, 2.0)
    # A name whose (re-)resolution turns private is refused inside the connector too.
    with pytest.raises(BlockedResolution) as info:
        await resolver.resolve("localhost", 80)
    assert info.value.error.code == "blocked_address"
    # A pinned name dials exactly the vetted address, whatever DNS says now.
    resolver.pin("localhost", [ipaddress.ip_address("127.0.0.2")])
    hosts = await resolver.resolve("localhost", 80)
    assert [h["host"] for h in hosts] == ["127.0.0.2"]
