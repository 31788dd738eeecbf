"""The result store: the one place a result is written to Redis.

Exactly-once results on top of at-least-once delivery: a Lua script does
`SET result NX` and, only when that wins, bumps the job counters, appends to the
job's result stream and publishes the notification, all atomically. A
redelivered item (worker killed after the write, before the ack) therefore
cannot produce a second result, count twice, or notify twice.

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
  local h = redis.call('HMGET', KEYS[2], 'total', 'done', 'failed', 'cancelled', 'state')
  local finished = (tonumber(h[2]) or 0) + (tonumber(h[3]) or 0) + (tonumber(h[4]) or 0)
  if h[1] and finished >= tonumber(h[1]) then
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

    async def record(self, result: TagResult) -> bool:
        """Store one result. True if it was the first for this item, False if a duplicate."""
        return (await self.record_many([result]))[0]

    async def record_many(self, results: Sequence[TagResult]) -> list[bool]:
        """Store a batch in one round trip (a pipeline of script calls)."""
        if not results:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for r in results:
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
