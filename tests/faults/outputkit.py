"""Helpers for the fault tests of jobs with an output: a moto S3 server, a manifest job
through the real route, and the job as Redis holds it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from tagpipe_cli.stack import Stack
from tagpipe_common.redis_io import connect_redis_sync

from tests.faults.kit import KEYS
from tests.integration.output_kit import BUCKET
from tests.s3kit import moto_server, s3_client, s3_user


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with moto_server(tmp_path_factory.mktemp("moto"), 3) as endpoint:
        env = s3_user(endpoint)
        s3_client(env).create_bucket(Bucket=BUCKET)
        yield env


def start_output_job(stack: Stack, s3_env: dict[str, str], run: str, urls: list[str]) -> str:
    """A manifest job through the real route: the manifest in S3, the output beside it."""
    manifest = "".join(json.dumps({"url": u, "id": f"c{i}"}) + "\n" for i, u in enumerate(urls))
    s3_client(s3_env).put_object(Bucket=BUCKET, Key=f"in/{run}.jsonl", Body=manifest.encode())
    body = {"source": f"s3://{BUCKET}/in/{run}.jsonl", "output": f"s3://{BUCKET}/{run}/"}
    r = httpx.post(f"{stack.gateway_url}/v1/manifest-jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


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


def redis_keys(stack: Stack) -> list[str]:
    r = connect_redis_sync(stack.redis_url)
    try:
        return [k.decode() for k in r.scan_iter(match="tagpipe:*")]
    finally:
        r.close()


def used_memory(stack: Stack, clients: bool = True) -> int:
    """Redis `used_memory`; with `clients=False`, less the clients' query and output
    buffers, which follow what each connection did last (a worker's pipelined batch
    leaves tens of KB that Redis shrinks lazily), not what Redis keeps."""
    r = connect_redis_sync(stack.redis_url)
    try:
        info = r.info("memory")
        held = 0 if clients else int(info.get("mem_clients_normal", 0))  # type: ignore[union-attr]
        return int(info["used_memory"]) - held  # type: ignore[index]
    finally:
        r.close()


def per_item_keys(stack: Stack) -> dict[str, int]:
    """Keys that exist once per item (result, fetch deadline, blob), by kind."""
    r = connect_redis_sync(stack.redis_url)
    try:
        return {kind: sum(1 for _ in r.scan_iter(f"*:{kind}:*", count=1000))
                for kind in ("result", "deadline", "blob")}  # fmt: skip
    finally:
        r.close()
