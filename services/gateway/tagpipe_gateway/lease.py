"""Per-job leases: one gateway at a time works on a job (publishes its items, writes
its output).

A lease is a Redis key holding its holder's id, with a TTL. The holder renews it as
it works; one that stalls past the TTL, or dies, loses it, and the next scan of any
gateway takes the job over (SET NX). Renewing and releasing check the holder first,
so a stalled holder that wakes up cannot extend or drop its successor's lease.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from redis.asyncio import Redis

# Renew the lease only while we still hold it.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLost(Exception):
    """Another gateway took the job over (we stalled past the lease)."""


class Leases:
    """One kind of per-job lease (`key` names a job's lease key), held by this process."""

    def __init__(self, redis: Redis, key: Callable[[str], str], ttl_s: int) -> None:
        self.redis, self.key, self.ttl_s = redis, key, ttl_s
        self.owner = uuid.uuid4().hex  # this process, as a lease holder
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    async def acquire(self, job_id: str) -> bool:
        return bool(await self.redis.set(self.key(job_id), self.owner, nx=True, ex=self.ttl_s))

    async def keep(self, job_id: str) -> None:
        """Renew the lease; LeaseLost if another holder has it now."""
        if not await self._renew(keys=[self.key(job_id)], args=[self.owner, self.ttl_s]):
            raise LeaseLost(job_id)

    async def release(self, job_id: str) -> None:
        """Give the job up (at shutdown), so another gateway takes it without waiting."""
        await self._release(keys=[self.key(job_id)], args=[self.owner])
