"""The Redis connection factory against real servers: one Redis, and a Sentinel set
(1 primary, 2 replicas, 3 sentinels) whose primary is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from tagpipe_cli.redis_ha import RedisSentinelSet
from tagpipe_cli.servers import ServerProcess, find_binary, free_port
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import DownloadTask, TagResult
from tagpipe_common.outage import is_transient
from tagpipe_common.redis_io import (
    Durability,
    NotReplicated,
    connect_redis,
    connect_redis_sync,
    require_redis,
)
from tagpipe_common.results import ResultStore

pytestmark = [pytest.mark.integration]
T = TypeVar("T")


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[RedisSentinelSet]:
    ha = RedisSentinelSet(tmp_path / "ha").start()
    yield ha
    ha.stop()


def _result(i: int) -> TagResult:
    task = DownloadTask(item_id=f"item-{i}", request_id="r", url=f"http://img/{i}.jpg")
    return TagResult.error(task, "fetch_failed", "test result", source=task.url)


async def test_a_plain_url_reaches_one_server(redis_proc: ServerProcess) -> None:
    client = connect_redis(redis_proc.url)
    try:
        store = ResultStore(client, RedisKeys(), ttl_s=600)  # no replicas: no WAIT
        assert await store.record(_result(1)) is True
        assert await store.record(_result(1)) is False
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_results_acked_by_a_replica_survive_the_primary_s_kill(
    sentinel_set: RedisSentinelSet,
) -> None:
    client = connect_redis(sentinel_set.url)
    store = ResultStore(client, RedisKeys(), 600, Durability(replicas=2, timeout_ms=5000))
    try:
        assert await store.record_many([_result(i) for i in range(50)]) == [True] * 50
        old = await asyncio.to_thread(sentinel_set.kill_primary)
        new = await asyncio.to_thread(sentinel_set.wait_failover, old)
        assert new.port != old.port
        # The same client follows the promoted replica by itself (asking the sentinels).
        got = await _ride_out(lambda: store.get_many([f"item-{i}" for i in range(50)]))
        assert [r.item_id for r in got if r is not None] == [f"item-{i}" for i in range(50)]
        # Still exactly once on the new primary; one replica left, so WAIT 1.
        store.durability = Durability(replicas=1, timeout_ms=5000)
        assert await _ride_out(lambda: store.record_many([_result(0), _result(99)])) == [
            False,
            True,
        ]
    finally:
        await client.aclose()


async def _ride_out(op: Callable[[], Awaitable[T]], timeout_s: float = 30.0) -> T:
    """What a worker's retry loop does: transient errors are retried, others raised."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await op()
        except Exception as exc:
            if not is_transient(exc) or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_a_wait_no_replica_can_meet_is_a_transient_error(
    sentinel_set: RedisSentinelSet,
) -> None:
    client = connect_redis(sentinel_set.url)
    try:
        store = ResultStore(client, RedisKeys(), 600, Durability(replicas=3, timeout_ms=50))
        with pytest.raises(NotReplicated) as exc:
            await store.record(_result(7))
        assert is_transient(exc.value)  # so workers hold the message and retry, never ack
        # The write itself landed: the retry with a reachable WAIT finds a duplicate.
        store.durability = Durability(replicas=2, timeout_ms=5000)
        assert await store.record(_result(7)) is False
    finally:
        await client.aclose()


def test_the_sync_client_reads_what_the_async_one_wrote(sentinel_set: RedisSentinelSet) -> None:
    with connect_redis_sync(sentinel_set.url) as r:
        r.set("k", "v")
        assert r.get("k") == b"v"
        assert r.info("replication")["connected_slaves"] == 2


def test_unreachable_sentinels_stop_startup_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/tagpipe/0"
    with pytest.raises(SystemExit) as exc:
        require_redis(url, "TestSettings", timeout_s=0.5)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TAGPIPE_REDIS_URL" in err[0] and "no Sentinel" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("binary", ["tagpipe-gateway", "tagpipe-downloader", "tagpipe-inference"])
def test_each_service_exits_2_naming_the_setting(binary: str, model_dir: Path) -> None:
    env = dict(os.environ)
    env.update(
        TAGPIPE_REDIS_URL=f"redis+sentinel://127.0.0.1:{free_port()}/tagpipe/0",
        TAGPIPE_REDIS_STARTUP_TIMEOUT_S="0.5",
        TAGPIPE_MODEL_DIR=str(model_dir.resolve()),
        TAGPIPE_NATS_URL=f"nats://127.0.0.1:{free_port()}",
    )
    proc = subprocess.run(
        [find_binary(binary)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    # Besides the JSON log records of what started before the check, one line.
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("{")]
    assert len(lines) == 1 and "TAGPIPE_REDIS_URL" in lines[0], proc.stderr
    assert "no Sentinel named a primary" in lines[0] and "<redis" not in lines[0]
