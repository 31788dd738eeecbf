"""Each item's hard deadline for all its download attempts together.

A per-attempt timeout alone does not bound an item: a server that trickles one
byte a second used every attempt of every delivery (3 attempts of 30 s, then a
NAK, up to max_deliver times: minutes). The deadline is wall-clock (epoch
seconds) so that any worker can continue it after a redelivery.

Where it lives: nowhere on the first delivery (the happy path costs no Redis
call); in Redis once an item is given back to JetStream, written with SET NX so
the first deadline stored wins. A delivery after the first reads it, or stores
a fresh one if the worker that had the item died before storing anything; so
a crash can at worst start the clock once more, never indefinitely.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis
from tagpipe_common.keys import RedisKeys

# How long a stored deadline is kept past its budget, unless the worker says: it
# still has to refuse late redeliveries (NAK delays, a crashed worker's ack wait),
# which all come within the redelivery window (max deliver x the longest of ack wait
# and NAK delay); then it expires, so no key per item outlives the item's deliveries.
KEEP_AFTER_DEADLINE_S = 3600.0


class ItemDeadlines:
    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        budget_s: float,
        keep_after_s: float = KEEP_AFTER_DEADLINE_S,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.budget_s = budget_s
        self.keep_after_s = keep_after_s

    def _ttl(self) -> int:
        return int(self.budget_s + self.keep_after_s) + 1

    async def deadline(self, item_id: str, delivery: int) -> float:
        """Epoch seconds by which every attempt at `item_id` must be over."""
        fresh = time.time() + self.budget_s
        if delivery <= 1:
            return fresh
        key = self.keys.fetch_deadline(item_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(key, repr(fresh), nx=True, ex=self._ttl())
            pipe.get(key)
            _, stored = await pipe.execute()
        return float(stored) if stored is not None else fresh

    async def keep(self, item_id: str, deadline: float) -> None:
        """Before an item goes back to JetStream: its next delivery goes on with `deadline`."""
        await self.redis.set(
            self.keys.fetch_deadline(item_id), repr(deadline), nx=True, ex=self._ttl()
        )
