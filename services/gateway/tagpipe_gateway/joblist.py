"""`GET /v1/jobs`: a caller's jobs, newest first, a page at a time.

Each caller has its own index (`keys.owner_jobs`, a sorted set of job ids scored
by creation time), so a page reads only the caller's jobs and no other caller's
job can appear. The cursor is the position of the last job returned (its score
and id): pages stay stable while new jobs arrive, since those sort above it.
Entries whose job hash has expired are dropped from the index as they are met.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from redis.asyncio import Redis
from tagpipe_common import keys as K
from tagpipe_common.keys import RedisKeys

from tagpipe_gateway.jobs import status_from_hash
from tagpipe_gateway.schemas import JobList, JobStatus
from tagpipe_gateway.submit import text

_CURSOR = re.compile(r"^(\d{1,12}(?:\.\d{1,9})?)_([A-Za-z0-9-]{1,100})$")
# A filtered page reads at most this many index entries, then hands back a cursor.
MAX_SCAN = 10_000
_CHUNK = 200


@dataclass(frozen=True)
class Cursor:
    score: float
    job_id: str

    @classmethod
    def parse(cls, raw: str) -> Cursor | None:
        m = _CURSOR.match(raw)
        return cls(float(m.group(1)), m.group(2)) if m else None

    def __str__(self) -> str:
        return f"{self.score!r}_{self.job_id}"


async def list_jobs(
    redis: Redis,
    keys: RedisKeys,
    owner: str,
    state: str | None,
    limit: int,
    after: Cursor | None,
) -> JobList:
    index = keys.owner_jobs(owner)
    top = "+inf" if after is None else repr(after.score)
    found: list[JobStatus] = []
    stale: list[str] = []
    last: Cursor | None = None
    offset = 0
    while len(found) < limit and offset < MAX_SCAN:
        # Offsets under a fixed upper score: jobs created meanwhile cannot shift them.
        chunk = await redis.zrevrangebyscore(
            index, top, "-inf", start=offset, num=_CHUNK, withscores=True
        )
        if not chunk:
            return await _page(redis, index, found, stale, None)
        offset += len(chunk)
        entries = [(text(m), float(s)) for m, s in chunk]
        if after is not None:
            # Equal scores come in reverse id order: the cursor's and those before it are read.
            entries = [(j, s) for j, s in entries if not (s == after.score and j >= after.job_id)]
        async with redis.pipeline(transaction=False) as pipe:
            for job_id, _ in entries:
                pipe.hgetall(keys.job(job_id))
            hashes = await pipe.execute()
        for (job_id, score), raw in zip(entries, hashes, strict=True):
            last = Cursor(score, job_id)
            h = {text(k): text(v) for k, v in raw.items()}
            if not h or h.get(K.JOB_OWNER) != owner:
                stale.append(job_id)
                continue
            status = status_from_hash(job_id, h)
            if state is None or status.state == state:
                found.append(status)
                if len(found) == limit:
                    break
    return await _page(redis, index, found, stale, last)


async def _page(
    redis: Redis, index: str, found: list[JobStatus], stale: list[str], last: Cursor | None
) -> JobList:
    if stale:
        await redis.zrem(index, *stale)
    return JobList(jobs=found, next_cursor=None if last is None else str(last))
