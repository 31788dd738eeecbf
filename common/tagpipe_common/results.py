"""The result store: the one place a result is written to Redis.

Exactly-once results on top of at-least-once delivery: a Lua script does
`SET result NX` and, only when that wins, bumps the job counters, appends to the
job's result stream and publishes the notification, all atomically. A
redelivered item (worker killed after the write, before the ack) therefore
cannot produce a second result, count twice, or notify twice.

Inline jobs keep every result in the job's result stream (the cursor of
`GET /v1/jobs/{id}/results`); the script gives the stream the job hash's expiry on
every append, so it expires with the job even when no gateway follows the job.

A job with an output (its hash has `shard_size`) keeps nothing per item past its
shard: `_OUTPUT_LUA` stages the item's output line (output.py) in its shard's hash
`HSETNX seq line` until the gateway's sink writes the shard to the object store,
then the shard's record in the job's shards hash refuses any later repeat, and once
`_manifest.json` is written (`manifest_at`) every later result is refused. Those are
its exactly-once guard, so there is no result key and no stream entry per item.

With replicas (Sentinel), `durability` adds a WAIT to the same round trip: a batch
counts as stored (and its messages are acked) only once enough replicas have it, so
a promoted replica cannot lack a result whose message is gone.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import cast

from redis.asyncio import Redis

from tagpipe_common import keys as K
from tagpipe_common.errors import ErrorCode
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import TagResult
from tagpipe_common.output import output_line, shard_of
from tagpipe_common.redis_io import Durability
from tagpipe_common.settings import CommonSettings

# KEYS: result, [job hash, job results stream]
# ARGV: payload, ttl_s, counter field, notify channel ('' for none), notify payload
_RECORD_LUA = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return 0
end
if #KEYS >= 3 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  redis.call('XADD', KEYS[3], '*', 'r', ARGV[1])
  -- the stream lives as long as the job, whoever (if anyone) follows the job
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
  local h = redis.call('HMGET', KEYS[2], 'total', 'done', 'failed', 'cancelled', 'state', 'output')
  local finished = (tonumber(h[2]) or 0) + (tonumber(h[3]) or 0) + (tonumber(h[4]) or 0)
  -- a job with an output ends only with its _manifest.json (the sink): here only a
  -- result without a seq, e.g. from a worker of a release before seq existed
  if h[1] and not h[6] and finished >= tonumber(h[1]) then
    if h[5] == 'running' then
      redis.call('HSET', KEYS[2], 'state', 'completed', 'finished_at', ARGV[6])
    elseif h[5] == 'cancelled' then
      -- a cancelled job ends too when its last item settles
      redis.call('HSETNX', KEYS[2], 'finished_at', ARGV[6])
    end
  end
end
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
"""

# An output job's result. KEYS: job hash, shard staging hash, staged set, ready set,
# shards hash, sinking set. ARGV: seq, line, counter field, shard size, shard, job id.
# The job never completes here: the sink does, once `_manifest.json` is written.
# Refused once its shard is written, or once `_manifest.json` is (`manifest_at`): a
# late result (a cancelled job's) would otherwise start a shard that no manifest lists.
_OUTPUT_LUA = """
if redis.call('HEXISTS', KEYS[5], ARGV[5]) == 1
    or redis.call('HEXISTS', KEYS[1], 'manifest_at') == 1 then
  return 0
end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
local n = redis.call('HLEN', KEYS[2])
if n == 1 then
  redis.call('SADD', KEYS[3], ARGV[5])
  redis.call('SADD', KEYS[6], ARGV[6])
  -- staging expires with the job: an abandoned job leaves nothing behind for good
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
end
if n >= tonumber(ARGV[4]) then
  redis.call('SADD', KEYS[4], ARGV[5])
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[4], ttl) end
end
return 1
"""
# Job ids whose shard size the store remembers (0: no output); cleared past this.
_JOB_CACHE_MAX = 4096


def counter_for(result: TagResult) -> str:
    if result.status == "ok":
        return K.JOB_DONE
    if result.code == ErrorCode.CANCELLED:
        return K.JOB_CANCELLED
    return K.JOB_FAILED


@dataclass
class ResultStore:
    redis: Redis
    keys: RedisKeys
    ttl_s: int = 86400
    durability: Durability = field(default_factory=Durability)

    @classmethod
    def for_settings(cls, redis: Redis, settings: CommonSettings) -> ResultStore:
        """The store every service uses: its prefix, TTL and WAIT policy from settings."""
        keys = RedisKeys(settings.prefix)
        return cls(redis, keys, settings.result_ttl_s, settings.redis_durability())

    def __post_init__(self) -> None:
        self._record = self.redis.register_script(_RECORD_LUA)
        self._output = self.redis.register_script(_OUTPUT_LUA)
        # A job's shard size never changes; 0 for a job without an output.
        self._shard_sizes: dict[str, int] = {}

    async def record(self, result: TagResult) -> bool:
        """Store one result. True if it was the first for this item, False if a duplicate."""
        return (await self.record_many([result]))[0]

    async def record_many(self, results: Sequence[TagResult]) -> list[bool]:
        """Store a batch in one round trip (a pipeline of script calls)."""
        if not results:
            return []
        await self._learn_shard_sizes(results)
        async with self.redis.pipeline(transaction=False) as pipe:
            for r in results:
                size = self._shard_size(r)
                if size:
                    keys_, args = self._output_args(r, size)
                    await self._output(keys=keys_, args=args, client=pipe)
                else:
                    keys_, args = self._script_args(r)
                    await self._record(keys=keys_, args=args, client=pipe)
            self.durability.queue(pipe)
            replies = self.durability.check(await pipe.execute())
        return [bool(x) for x in replies]

    def _script_args(self, r: TagResult) -> tuple[list[str], list[str | int | float]]:
        keys_ = [self.keys.result(r.item_id)]
        if r.job_id is not None:
            keys_ += [self.keys.job(r.job_id), self.keys.job_results(r.job_id)]
        channel = self.keys.notify_channel if r.request_id is not None else ""
        note = json.dumps({"item_id": r.item_id, "request_id": r.request_id})
        payload = r.to_json().decode()
        return keys_, [payload, self.ttl_s, counter_for(r), channel, note, r.finished_at]

    def _shard_size(self, r: TagResult) -> int:
        if r.job_id is None or r.seq is None:
            return 0
        return self._shard_sizes.get(r.job_id, 0)

    async def _learn_shard_sizes(self, results: Sequence[TagResult]) -> None:
        """Read `shard_size` of the jobs of this batch not seen before (one round trip)."""
        new = sorted(
            {r.job_id for r in results if r.job_id is not None and r.seq is not None}
            - set(self._shard_sizes)
        )
        if not new:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in new:
                pipe.hmget(self.keys.job(job_id), [K.JOB_SHARD_SIZE, K.JOB_OUTPUT])
            replies = await pipe.execute()
        if len(self._shard_sizes) + len(new) > _JOB_CACHE_MAX:
            self._shard_sizes.clear()
        for job_id, (size, output) in zip(new, replies, strict=True):
            self._shard_sizes[job_id] = int(size) if size and output else 0

    def _output_args(self, r: TagResult, size: int) -> tuple[list[str], list[str | int | float]]:
        assert r.job_id is not None and r.seq is not None
        job, shard = r.job_id, shard_of(r.seq, size)
        keys_ = [
            self.keys.job(job),
            self.keys.job_shard(job, shard),
            self.keys.job_staged(job),
            self.keys.job_ready(job),
            self.keys.job_shards(job),
            self.keys.sinking_jobs,
        ]
        line = output_line(r).decode()
        return keys_, [r.seq, line, counter_for(r), size, shard, job]

    async def get(self, item_id: str) -> TagResult | None:
        raw = await self.redis.get(self.keys.result(item_id))
        return None if raw is None else TagResult.from_json(raw)

    async def get_many(self, item_ids: Sequence[str]) -> list[TagResult | None]:
        if not item_ids:
            return []
        raws = await self.redis.mget([self.keys.result(i) for i in item_ids])
        return [None if r is None else TagResult.from_json(r) for r in raws]

    async def job_state(self, job_id: str) -> str | None:
        # redis-py types hget as sync-or-async; this client is async.
        raw = await cast(
            Awaitable[bytes | str | None], self.redis.hget(self.keys.job(job_id), K.JOB_STATE)
        )
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)
