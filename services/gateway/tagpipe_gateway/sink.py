"""The sink of jobs with an output: staged results -> gzip JSONL shards -> `_manifest.json`.

The result store stages each result of an output job under its shard and marks a
shard ready once it holds `shard_size` lines (results.py). Any gateway may write a
job's output; one at a time holds the job's sink lease (as submit.py's publishing
lease), and if it dies (kill -9) the lease expires and the next scan of another
gateway, or the same one restarted, resumes the job. Nothing is lost in between:

- a shard is read from Redis, encoded (output.encode_shard: same lines, same bytes),
  written, and only then recorded and its staging deleted, in one script that first
  checks no line arrived meanwhile. A sink killed between the write and the record
  writes the same object again.
- When every item has settled (or a cancelled job's redelivery window has passed),
  the rest of the staged shards are written, then `_manifest.json`, and only then is
  the job `completed` (a cancelled job keeps its state and gets its `finished_at`).

Per job, Redis keeps the job hash and one small record per written shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from tagpipe_common import keys as K
from tagpipe_common.keys import RedisKeys
from tagpipe_common.nats_io import cancel_until_done
from tagpipe_common.objectstore import put_bytes
from tagpipe_common.outage import describe
from tagpipe_common.output import (
    MANIFEST_CONTENT_TYPE,
    MANIFEST_NAME,
    SHARD_CONTENT_TYPE,
    Shard,
    encode_shard,
    manifest,
)

from tagpipe_gateway.lease import LeaseLost, Leases
from tagpipe_gateway.settings import GatewaySettings
from tagpipe_gateway.submit import aw, text

log = logging.getLogger(__name__)

# How often a held job is looked at, and how long to back off after a failed round.
POLL_S = 0.25
RETRY_S = 2.0
CLOSE_TIMEOUT_S = 5.0

# KEYS: shards hash, staging hash, staged set, ready set, job hash.
# ARGV: shard, its record (JSON), the lines written. 0: a line arrived after the read.
_COMMIT_LUA = """
if redis.call('HLEN', KEYS[2]) ~= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[5])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"""

# KEYS: job hash, sinking set, staged set. ARGV: now, job id, the state `_manifest.json`
# says. After it is written. 0, nothing changed: a line was staged, or the job was
# cancelled, since the manifest was made; the next round writes both again. Once
# `manifest_at` is set the result store refuses every later line (results.py).
_FINISH_LUA = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then
  redis.call('SREM', KEYS[2], ARGV[2])
  return false
end
if redis.call('SCARD', KEYS[3]) > 0 or (s == 'cancelled') ~= (ARGV[3] == 'cancelled') then
  return 0
end
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'manifest_at', ARGV[1])
if s == 'cancelled' then
  redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[1])
elseif s ~= 'completed' then
  redis.call('HSET', KEYS[1], 'state', 'completed', 'finished_at', ARGV[1])
end
return s
"""

_FIELDS = [
    K.JOB_STATE, K.JOB_OUTPUT, K.JOB_SHARD_SIZE, K.JOB_TOTAL,
    K.JOB_DONE, K.JOB_FAILED, K.JOB_CANCELLED, K.JOB_CANCELLED_AT,
]  # fmt: skip


@dataclass(frozen=True)
class OutputJob:
    job_id: str
    state: str
    output: str
    shard_size: int
    total: int | None
    finished: int
    cancelled_at: float | None

    def settled(self, window_s: float, now: float) -> bool:
        """Every item has its line, or (cancelled) none can still arrive."""
        if self.state == K.JOB_STATE_SUBMITTING or self.total is None:
            return self.state == K.JOB_STATE_CANCELLED and self._window_over(window_s, now)
        if self.finished >= self.total:
            return True
        return self.state == K.JOB_STATE_CANCELLED and self._window_over(window_s, now)

    def _window_over(self, window_s: float, now: float) -> bool:
        return self.cancelled_at is not None and now >= self.cancelled_at + window_s


def _job(job_id: str, raw: list[bytes | None]) -> OutputJob | None:
    state, output, size, total, *counts, cancelled_at = (
        None if v is None else text(v) for v in raw
    )
    if state is None or not output or not size:
        return None
    return OutputJob(
        job_id, state, output, int(size),
        None if total is None else int(total),
        sum(int(c or 0) for c in counts),
        None if cancelled_at is None else float(cancelled_at),
    )  # fmt: skip


class Sink:
    """Writes the output of every job in the sinking set that this gateway can lease."""

    def __init__(self, redis: Redis, keys: RedisKeys, settings: GatewaySettings) -> None:
        self.redis, self.keys, self.s = redis, keys, settings
        self.lease = Leases(redis, keys.job_sink_lease, settings.lease_s)
        # After a cancel, in-flight items may still land for this long (max deliver x
        # ack wait); a cancelled job's partial shards are written after it.
        self.window_s = settings.max_deliver * settings.ack_wait_s
        self._commit = redis.register_script(_COMMIT_LUA)
        self._finish = redis.register_script(_FINISH_LUA)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._scan_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._scan_task = asyncio.create_task(self._scan(), name="sink-scan")

    async def close(self) -> None:
        jobs, tasks = list(self._tasks), list(self._tasks.values())
        if self._scan_task is not None:
            tasks.append(self._scan_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            await cancel_until_done(task, CLOSE_TIMEOUT_S)
        for job_id in jobs:  # another gateway takes over without waiting for the lease
            with contextlib.suppress(Exception):
                await self.lease.release(job_id)

    async def _scan(self) -> None:
        while True:
            try:
                for raw in await aw(self.redis.smembers(self.keys.sinking_jobs)):
                    job_id = text(raw)
                    if job_id not in self._tasks and await self.lease.acquire(job_id):
                        self._spawn(job_id)
            except Exception as exc:  # Redis away: next round
                log.warning("sink scan failed: %s", describe(exc))
            await asyncio.sleep(self.s.recover_interval_s)

    def _spawn(self, job_id: str) -> None:
        task = asyncio.create_task(self._run(job_id), name=f"sink-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    async def _run(self, job_id: str) -> None:
        try:
            await self.run_job(job_id)
        except LeaseLost:
            log.warning("job %s: sink lease lost; another gateway writes its output", job_id)

    async def run_job(self, job_id: str) -> None:
        """Write the job's shards as they fill, then its manifest; returns when done."""
        while True:
            await self.lease.keep(job_id)
            try:
                if await self._round(job_id):
                    return
            except LeaseLost:
                raise
            except Exception as exc:  # the store or Redis away: the lease is kept, retry
                log.warning("job %s: sink round failed: %s", job_id, describe(exc))
                await asyncio.sleep(RETRY_S)
                continue
            await asyncio.sleep(POLL_S)

    async def _round(self, job_id: str) -> bool:
        """One look at the job; True once its manifest is written (or it is gone)."""
        job = _job(job_id, await aw(self.redis.hmget(self.keys.job(job_id), _FIELDS)))
        if job is None:  # expired, or not an output job
            await aw(self.redis.srem(self.keys.sinking_jobs, job_id))
            return True
        for shard in await self._members(self.keys.job_ready(job_id)):
            await self.write_shard(job, shard)
            await self.lease.keep(job_id)
        if not job.settled(self.window_s, time.time()):
            return False
        for shard in await self._members(self.keys.job_staged(job_id)):
            await self.write_shard(job, shard)
            await self.lease.keep(job_id)
        if await self._members(self.keys.job_staged(job_id)):
            return False  # a late line arrived: that shard again next round
        return await self.finish(job)

    async def _members(self, key: str) -> list[int]:
        return sorted(int(m) for m in await aw(self.redis.smembers(key)))

    async def write_shard(self, job: OutputJob, shard: int) -> bool:
        """Write one shard from its staged lines and forget them; False if it must be
        written again (a line arrived meanwhile)."""
        staging = self.keys.job_shard(job.job_id, shard)
        staged: dict[bytes, bytes] = await aw(self.redis.hgetall(staging))
        if not staged:  # written already (a stale set member)
            await self._forget(job.job_id, shard)
            return True
        data, record = await asyncio.to_thread(encode_shard, shard, staged)
        url = job.output + record.name
        # Only the lease holder writes: a stale sink could replace a shard that another
        # one wrote (with a late line more) by its older lines.
        await self.lease.keep(job.job_id)
        await asyncio.to_thread(put_bytes, url, data, SHARD_CONTENT_TYPE)
        keys_ = [
            self.keys.job_shards(job.job_id),
            staging,
            self.keys.job_staged(job.job_id),
            self.keys.job_ready(job.job_id),
            self.keys.job(job.job_id),
        ]
        done = bool(await self._commit(keys=keys_, args=[shard, record.to_json(), record.lines]))
        log.info("job %s: wrote %s (%d lines)%s", job.job_id, url, record.lines,
                 "" if done else "; a line arrived meanwhile, writing it again")  # fmt: skip
        return done

    async def _forget(self, job_id: str, shard: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.srem(self.keys.job_staged(job_id), shard)
            pipe.srem(self.keys.job_ready(job_id), shard)
            await pipe.execute()

    async def finish(self, job: OutputJob) -> bool:
        """`_manifest.json`, then the job's final state, then the job's working keys go.
        False if a line was staged or the job cancelled meanwhile (written again next round)."""
        raw = await aw(self.redis.hvals(self.keys.job_shards(job.job_id)))
        shards = [Shard.from_json(v) for v in raw]
        state = K.JOB_STATE_CANCELLED if job.state == K.JOB_STATE_CANCELLED else "completed"
        body = manifest(job.job_id, state, job.total, job.shard_size, shards)
        await self.lease.keep(job.job_id)  # a sink that lost its lease writes nothing more
        await asyncio.to_thread(put_bytes, job.output + MANIFEST_NAME, body, MANIFEST_CONTENT_TYPE)
        job_key, staged = self.keys.job(job.job_id), self.keys.job_staged(job.job_id)
        keys_ = [job_key, self.keys.sinking_jobs, staged]
        ended = await self._finish(keys=keys_, args=[time.time(), job.job_id, state])
        if ended == 0:
            log.info("job %s: a line or a cancel came meanwhile; its manifest again", job.job_id)
            return False
        await self.redis.delete(
            self.keys.job_urls(job.job_id),
            self.keys.job_staged(job.job_id),
            self.keys.job_ready(job.job_id),
            self.keys.job_sink_lease(job.job_id),
        )
        log.info("job %s: output complete, %d shard(s), state %s", job.job_id, len(shards), state)
        return True
