"""Bulk jobs' states, remembered for a moment.

Every item of a job asks whether the job was cancelled before it is fetched;
one Redis read per job every `ttl_s`, not one per item, answers them all, and a
cancellation still stops the job's remaining items within `ttl_s`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from tagpipe_common.keys import JOB_STATE_CANCELLED

# Enough for every job a downloader sees at once; past it the memo starts over.
MAX_JOBS = 10_000


State = str | None
Read = Callable[[str], Awaitable[State]]
Retry = Callable[[Callable[[], Awaitable[State]]], Awaitable[State]]


class JobStates:
    def __init__(self, read: Read, retry: Retry, ttl_s: float) -> None:
        self._read = read  # a job's state from Redis
        self._retry = retry  # the worker's policy for Redis calls (waits out outages)
        self._ttl_s = ttl_s
        self._known: dict[str, tuple[float, str | None]] = {}

    async def cancelled(self, job_id: str) -> bool:
        now = time.monotonic()
        known = self._known.get(job_id)
        if known is None or known[0] < now:
            state = await self._retry(lambda: self._read(job_id))
            if len(self._known) > MAX_JOBS:
                self._known.clear()
            known = (now + self._ttl_s, state)
            self._known[job_id] = known
        return known[1] == JOB_STATE_CANCELLED
