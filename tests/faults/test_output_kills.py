"""kill -9 mid-job on the real local stack, for the jobs of issue #29:

- a job with an output: kill -9 of an inference worker, or of the gateway that runs
  the job's sink (restarted, as a pod would be): exactly one line per item across the
  written shards, and `_manifest.json` says so;
- an inline job: kill -9 of the gateway once every item is published (so no gateway
  follows the job any more): its result stream still expires with the job.

The output job is made as the manifest route's contract makes it (job hash with
`output` and `shard_size`) and its items published to JetStream with their `seq`:
the real downloaders, inference workers, result store and sink do the rest.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from tagpipe_cli.stack import Stack
from tagpipe_common import keys as K
from tagpipe_common.messages import DownloadTask
from tagpipe_common.nats_io import close_nats, connect_nats
from tagpipe_common.redis_io import connect_redis_sync
from tagpipe_common.subjects import Lane
from tagpipe_gateway.queue import Publisher

from bench.imageserver import ImageServer
from tests.faults.kit import KEYS, image_urls, job_status, service, submit_job, wait_finished
from tests.integration.output_kit import BUCKET, all_lines, read_manifest
from tests.s3kit import moto_server, s3_client, s3_user

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 1500
SHARD_SIZE = 200


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with moto_server(tmp_path_factory.mktemp("moto"), 3) as endpoint:
        env = s3_user(endpoint)
        s3_client(env).create_bucket(Bucket=BUCKET)
        yield env


def start_output_job(stack: Stack, job_id: str, urls: list[str]) -> None:
    """The job hash (running, total known) and its items on the bulk lane."""
    r = connect_redis_sync(stack.redis_url)
    try:
        r.hset(KEYS.job(job_id), mapping={
            K.JOB_TOTAL: len(urls), K.JOB_DONE: 0, K.JOB_FAILED: 0, K.JOB_CANCELLED: 0,
            K.JOB_SUBMITTED: len(urls), K.JOB_STATE: K.JOB_STATE_RUNNING,
            K.JOB_CREATED_AT: time.time(), K.JOB_KIND: K.JOB_KIND_MANIFEST,
            K.JOB_OUTPUT: f"s3://{BUCKET}/{job_id}/", K.JOB_SHARD_SIZE: SHARD_SIZE,
        })  # fmt: skip
        r.expire(KEYS.job(job_id), 3600)
    finally:
        r.close()
    tasks = [
        DownloadTask(
            item_id=f"{job_id}-n{seq}",
            job_id=job_id,
            seq=seq,
            lane=Lane.BULK,
            client_item_id=f"c{seq}",
            url=url,
        )
        for seq, url in enumerate(urls)
    ]

    async def publish() -> None:
        nc = await connect_nats(stack.nats_url.split(","), "test-output-kills")
        try:
            publisher = Publisher(nc.jetstream(), "tagpipe")
            for start in range(0, len(tasks), 200):
                await publisher.publish_many(tasks[start : start + 200])
        finally:
            await close_nats(nc)

    asyncio.run(publish())


def job_hash(stack: Stack, job_id: str) -> dict[str, str]:
    r = connect_redis_sync(stack.redis_url)
    try:
        raw: dict[bytes, bytes] = r.hgetall(KEYS.job(job_id))  # type: ignore[assignment]
        shards = int(r.hlen(KEYS.job_shards(job_id)))  # type: ignore[arg-type]
    finally:
        r.close()
    return {k.decode(): v.decode() for k, v in raw.items()} | {"shards_written": str(shards)}


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.parametrize("victim", ["inference-0", "gateway"])
def test_kill_9_mid_output_job_leaves_one_line_per_item(
    make_stack: Callable[..., Stack],
    images: ImageServer,
    s3_env: dict[str, str],
    victim: str,
) -> None:
    stack = make_stack(gateway_env=s3_env)
    job_id = f"out-{victim}"
    start_output_job(stack, job_id, image_urls(images, N, job_id))
    # Mid-job: some shards written, most items still to come.
    wait_for(lambda: int(job_hash(stack, job_id)["shards_written"]) >= 1, "a first shard")
    svc = service(stack, victim)
    svc.signal(signal.SIGKILL)
    assert svc.wait(10) and svc.proc is not None and svc.proc.returncode == -signal.SIGKILL
    at_kill = job_hash(stack, job_id)
    if victim == "gateway":
        svc.start()  # a new pod: it finds the job in the sinking set once the lease expires
    wait_for(lambda: job_hash(stack, job_id).get(K.JOB_STATE) == "completed", "completion")
    end = job_hash(stack, job_id)
    finished_at_kill = sum(int(at_kill.get(f, 0)) for f in ("done", "failed"))
    assert finished_at_kill < N, "the job ended before the kill: nothing was in flight"
    lines = all_lines(s3_client(s3_env), f"{job_id}/")
    seqs = [x["seq"] for x in lines]
    assert sorted(seqs) == list(range(N)), f"{len(seqs)} lines, {len(set(seqs))} distinct"
    assert [x["id"] for x in lines] == [f"c{s}" for s in range(N)]
    doc = read_manifest(s3_client(s3_env), f"{job_id}/")
    assert doc["state"] == "completed" and doc["lines"] == N
    assert doc["counts"]["ok"] == int(end["done"]) == N  # every image is good
    assert len(doc["shards"]) == -(-N // SHARD_SIZE)
    assert not any(k.startswith("tagpipe:result:out-") for k in result_keys(stack))


def result_keys(stack: Stack) -> list[str]:
    r = connect_redis_sync(stack.redis_url)
    try:
        return [k.decode() for k in r.scan_iter(match="tagpipe:result:*")]
    finally:
        r.close()


def test_inline_result_stream_expires_with_the_job_after_its_gateway_died(
    make_stack: Callable[..., Stack], images: ImageServer
) -> None:
    stack = make_stack()
    n = 400
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
        job_id = submit_job(http, image_urls(images, n, "inline-kill"))
        # Every item published: the job has left the submitting set, and only this
        # gateway's tail follows it. Kill it there, mid-job.
        deadline = time.monotonic() + 120
        while (s := job_status(http, job_id))["submitted"] < n or s["state"] != "running":
            assert time.monotonic() < deadline, s
            time.sleep(0.2)
        assert s["finished"] < n, "the job ended before the kill"
        gateway = service(stack, "gateway")
        gateway.signal(signal.SIGKILL)
        assert gateway.wait(10)
        gateway.start()
        wait_finished(http, job_id, n, timeout_s=240)
    r = connect_redis_sync(stack.redis_url)
    try:
        job_ttl = int(r.pttl(KEYS.job(job_id)))  # type: ignore[arg-type]
        stream_ttl = int(r.pttl(KEYS.job_results(job_id)))  # type: ignore[arg-type]
        length = int(r.xlen(KEYS.job_results(job_id)))  # type: ignore[arg-type]
    finally:
        r.close()
    assert length == n
    assert 0 < stream_ttl <= job_ttl, (stream_ttl, job_ttl)  # -1 was: never expires
