"""Fixtures that start real NATS JetStream and Redis servers on free ports.

Tests never depend on a server someone started by hand: each fixture starts its
own process with a temporary data directory and stops it afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from redis.asyncio import Redis
from tagpipe_cli.servers import ServerProcess, nats_server, redis_server
from tagpipe_common.keys import RedisKeys
from tagpipe_common.nats_io import close_nats, connect_nats
from tagpipe_common.results import ResultStore
from tagpipe_common.streams import StreamPolicy, ensure_streams


@pytest.fixture
def nats_proc(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = nats_server(tmp_path / "nats").start()
    yield srv
    srv.stop()


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = redis_server(tmp_path / "redis").start()
    yield srv
    srv.stop()


@pytest.fixture
async def nc(nats_proc: ServerProcess) -> AsyncIterator[Client]:
    client = await connect_nats([nats_proc.url], "tests")
    yield client
    await close_nats(client)


@pytest.fixture
def policy() -> StreamPolicy:
    return StreamPolicy(prefix="tagpipe", ack_wait_s=2.0, max_deliver=3)


@pytest.fixture
async def js(nc: Client, policy: StreamPolicy) -> JetStreamContext:
    ctx = nc.jetstream()
    await ensure_streams(ctx, policy)
    return ctx


@pytest.fixture
async def redis(redis_proc: ServerProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_proc.url)
    yield client
    await client.aclose()


@pytest.fixture
def store(redis: Redis) -> ResultStore:
    return ResultStore(redis, RedisKeys(), ttl_s=600)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model directory built by `make model` (or TAGPIPE_TEST_MODEL_DIR)."""
    import os

    path = Path(os.environ.get("TAGPIPE_TEST_MODEL_DIR", "models/efficientnet-lite0"))
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parent.parent / path  # pytest run from elsewhere
    if not (path / "manifest.json").is_file():
        pytest.fail(f"no model at {path}: run `make model` first", pytrace=False)
    return path
