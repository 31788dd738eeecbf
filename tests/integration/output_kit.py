"""Helpers for the tests of jobs with an output: a job hash as the manifest route makes
it, results as the workers make them, and reading the written shards back.
"""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

from redis.asyncio import Redis
from tagpipe_common import keys as K
from tagpipe_common.errors import ErrorCode
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import Tag, TagResult
from tagpipe_common.subjects import Lane

JOB_TTL_S = 3600
BUCKET = "out"


async def create_output_job(
    redis: Redis, keys: RedisKeys, job_id: str, output: str, shard_size: int, total: int | None
) -> None:
    """The job hash of a running manifest job (the fields of the #29 contract)."""
    fields: dict[str, Any] = {
        K.JOB_DONE: 0, K.JOB_FAILED: 0, K.JOB_CANCELLED: 0, K.JOB_SUBMITTED: 0,
        K.JOB_STATE: K.JOB_STATE_RUNNING, K.JOB_CREATED_AT: time.time(),
        K.JOB_KIND: K.JOB_KIND_MANIFEST, K.JOB_OUTPUT: output, K.JOB_SHARD_SIZE: shard_size,
    }  # fmt: skip
    if total is not None:
        fields[K.JOB_TOTAL] = total
    await redis.hset(keys.job(job_id), mapping=fields)  # type: ignore[misc]
    await redis.expire(keys.job(job_id), JOB_TTL_S)


def result(job_id: str, seq: int) -> TagResult:
    """Item `seq`: ok, except every 7th (a download error) and every 11th (bad image)."""
    common: dict[str, Any] = {
        "item_id": f"{job_id}-n{seq}", "job_id": job_id, "seq": seq, "lane": Lane.BULK,
        "client_item_id": f"c{seq}" if seq % 2 else None,
        "source": f"https://img.example/{seq}.jpg",
    }  # fmt: skip
    if seq % 7 == 3:
        return TagResult(**common, status="error", code=ErrorCode.DNS_ERROR, message="no host")
    if seq % 11 == 5:
        return TagResult(**common, status="error", code=ErrorCode.DECODE_ERROR, message="bad")
    tags = [Tag(label="tabby", score=0.75, class_id=281), Tag(label="tiger cat", score=0.125)]
    return TagResult(**common, status="ok", tags=tags, model_version="lite0@1")


def read_lines(s3: Any, key: str) -> list[dict[str, Any]]:
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return [json.loads(line) for line in gzip.decompress(body).splitlines()]


def all_lines(s3: Any, prefix: str) -> list[dict[str, Any]]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    shards = sorted(o["Key"] for o in listed if o["Key"].endswith(".jsonl.gz"))
    return [line for key in shards for line in read_lines(s3, key)]


def read_manifest(s3: Any, prefix: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        s3.get_object(Bucket=BUCKET, Key=f"{prefix}_manifest.json")["Body"].read()
    )
    return doc


async def keys_left(redis: Redis, prefix: str) -> list[str]:
    return sorted([k.decode() async for k in redis.scan_iter(match=f"{prefix}:*")])
