"""kill -9 mid-job on the real local stack, for the jobs of issue #29:

- a job with an output: kill -9 of an inference worker, or of the gateway that runs
  the job's sink (restarted, as a pod would be): exactly one line per item across the
  written shards, and `_manifest.json` says so;
- an inline job: kill -9 of the gateway once every item is published (so no gateway
  follows the job any more): its result stream still expires with the job.

The output job goes through the real path: a JSONL manifest in a moto S3 server,
`POST /v1/manifest-jobs`, the gateway's manifest reader, the downloaders, inference
workers, the result store and the gateway's sink writing shards back to moto.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import httpx
import pytest
from tagpipe_cli.stack import Stack
from tagpipe_common import keys as K
from tagpipe_common.redis_io import connect_redis_sync

from bench.imageserver import ImageServer
from tests.faults.kit import KEYS, image_urls, job_status, service, submit_job, wait_finished
from tests.faults.outputkit import job_hash, redis_keys, s3_env, start_output_job, wait_for
from tests.integration.output_kit import all_lines, read_manifest
from tests.s3kit import s3_client

__all__ = ["s3_env"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 1500
SHARD_SIZE = 200


@pytest.mark.parametrize("victim", ["inference-0", "gateway"])
def test_kill_9_mid_output_job_leaves_one_line_per_item(
    make_stack: Callable[..., Stack],
    images: ImageServer,
    s3_env: dict[str, str],
    victim: str,
) -> None:
    stack = make_stack(gateway_env={**s3_env, "TAGPIPE_SHARD_SIZE": str(SHARD_SIZE)})
    run = f"out-{victim}"
    job_id = start_output_job(stack, s3_env, run, image_urls(images, N, run))
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
    lines = all_lines(s3_client(s3_env), f"{run}/")
    seqs = [x["seq"] for x in lines]
    assert sorted(seqs) == list(range(N)), f"{len(seqs)} lines, {len(set(seqs))} distinct"
    assert [x["id"] for x in lines] == [f"c{s}" for s in range(N)]
    doc = read_manifest(s3_client(s3_env), f"{run}/")
    assert doc["state"] == "completed" and doc["lines"] == N
    assert doc["counts"]["ok"] == int(end["done"]) == N  # every image is good
    assert len(doc["shards"]) == -(-N // SHARD_SIZE)
    # Nothing per item stays: only the fetch deadlines of redelivered items (deadline.py).
    per_item = [k for k in redis_keys(stack) if f"{job_id}-n" in k]
    assert all(k.startswith("tagpipe:deadline:") for k in per_item), per_item[:5]


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
