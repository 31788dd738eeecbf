"""A list of NATS servers against real nats-server processes: the 3-server JetStream
cluster (R3 streams) the services reconnect across, and the start-up check that
stops a process whose list reaches no server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from tagpipe_cli.nats_cluster import NatsCluster, run_async
from tagpipe_cli.servers import ServerProcess, find_binary, free_port
from tagpipe_common.nats_io import close_nats, connect_nats, require_nats
from tagpipe_common.outage import is_transient
from tagpipe_common.streams import StreamPolicy, ensure_streams
from tagpipe_common.subjects import Lane, Stage, stage_names

pytestmark = [pytest.mark.integration]
DOWNLOAD = stage_names(Stage.DOWNLOAD)
T = TypeVar("T")


async def riding_out(step: Callable[[], Awaitable[T]], timeout_s: float = 30) -> T:
    """`step` retried while the cluster answers "unavailable" (an election still under
    way, the consumer's after the stream's), as the services' outage loops do."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await step()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path / "nats").start()
    yield c
    c.stop()


def test_streams_are_r3_and_survive_their_leader_s_kill(cluster: NatsCluster) -> None:
    """A message published before the stream leader's kill -9 is still there after the
    election, read through a client that held the whole list and reconnected."""

    async def before() -> int:
        nc = await connect_nats(cluster.urls, "test")
        try:
            js = nc.jetstream(timeout=5)
            await riding_out(lambda: ensure_streams(js, StreamPolicy(replicas=3)))
            await js.publish(DOWNLOAD.subject(Lane.BULK), b"kept", timeout=5)
            info = await js.stream_info(DOWNLOAD.stream)
            return int(info.config.num_replicas or 0)
        finally:
            await close_nats(nc)

    assert run_async(before, 60) == 3
    cluster.wait_current(DOWNLOAD.stream)
    leader = cluster.stream_leader(DOWNLOAD.stream)
    leader.kill()
    assert cluster.stream_leader(DOWNLOAD.stream) is not leader

    async def after() -> bytes:
        nc = await connect_nats(cluster.urls, "test")  # the dead server is still listed
        try:
            js = nc.jetstream(timeout=5)
            sub = await js.pull_subscribe_bind(DOWNLOAD.consumer(Lane.BULK), DOWNLOAD.stream)
            (msg,) = await riding_out(lambda: sub.fetch(1, timeout=5))
            await msg.ack()
            return msg.data
        finally:
            await close_nats(nc)

    assert run_async(after, 60) == b"kept"


def test_a_list_with_one_live_server_passes_the_start_up_check(
    nats_proc: ServerProcess,
) -> None:
    require_nats([f"nats://127.0.0.1:{free_port()}", nats_proc.url], "TestSettings", 10)


def test_a_list_reaching_no_server_stops_start_up_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    urls = [f"nats://user:secret@127.0.0.1:{free_port()}", f"nats://127.0.0.1:{free_port()}"]
    with pytest.raises(SystemExit) as exc:
        require_nats(urls, "TestSettings", timeout_s=1)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TAGPIPE_NATS_URL" in err[0], err
    assert "secret" not in err[0] and "Connect call failed" in err[0], err


@pytest.mark.slow
@pytest.mark.parametrize("binary", ["tagpipe-gateway", "tagpipe-downloader", "tagpipe-inference"])
def test_each_service_exits_2_naming_the_nats_setting(
    binary: str, model_dir: Path, redis_proc: ServerProcess
) -> None:
    env = dict(os.environ)
    env.update(
        TAGPIPE_REDIS_URL=redis_proc.url,
        TAGPIPE_NATS_URL=f"nats://127.0.0.1:{free_port()},nats://127.0.0.1:{free_port()}",
        TAGPIPE_NATS_STARTUP_TIMEOUT_S="1",
        TAGPIPE_MODEL_DIR=str(model_dir.resolve()),
    )
    proc = subprocess.run(
        [find_binary(binary)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    # Besides the JSON log records of what started before the check, one line.
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("{")]
    assert len(lines) == 1 and "TAGPIPE_NATS_URL" in lines[0], proc.stderr
