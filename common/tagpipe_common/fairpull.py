"""One lane's pull across every partition of a stage, fairly: the consumer side of
partitions (subjects.partition_names).

A worker keeps one `FairPull` per lane and asks it for messages exactly as it
asked one pull subscription before, so the lane order (real-time first) stays
the worker's and partitions stay out of its loop. With one partition it is that
subscription's `fetch`, unchanged.

With several, each partition has at most one fetch in flight (nats.py's fetch is
not safe to run twice at once on one subscription), asking for its share of the
call's `n` (ceil(n / N)), so a call never pulls much more than asked. A call
starts a fetch on every partition that has none, and returns as soon as any of
them has messages: a message arriving on any partition is seen as soon as it
would be on one, and an empty partition never holds up a full one. A fetch still
running when the call returns goes on, and what it brings is kept for the next
call (`_carry`). Messages are handed out partition by partition, starting one
further each call, so a busy partition cannot starve the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.client import JetStreamContext

from tagpipe_common.streams import give_back_buffered
from tagpipe_common.subjects import Lane, StageNames

PullSub = JetStreamContext.PullSubscription


class FairPull:
    """Fetch from N pull subscriptions (one lane's consumer in each partition)."""

    def __init__(self, subs: list[PullSub]) -> None:
        if not subs:
            raise ValueError("FairPull needs at least one subscription")
        self.subs = subs
        self._inflight: dict[int, asyncio.Task[list[Msg]]] = {}
        self._carry: list[deque[Msg]] = [deque() for _ in subs]
        self._start = 0  # the partition handed out first on the next call
        self.taken = [0] * len(subs)  # messages handed out per partition (tests, metrics)

    async def fetch(self, n: int, wait_s: float) -> list[Msg]:
        """Up to `n` messages, waiting at most `wait_s` for the first.

        One partition: the subscription's own fetch (raises its TimeoutError when
        none came). Several: [] when none came; a fetch error (a broker outage)
        is raised as the subscription raised it.
        """
        if len(self.subs) == 1:
            msgs = await self.subs[0].fetch(n, timeout=wait_s)
            self.taken[0] += len(msgs)
            return msgs
        if not self._carried():
            share = -(-n // len(self.subs))  # ceil(n / N)
            for i, sub in enumerate(self.subs):
                if i not in self._inflight:
                    self._inflight[i] = asyncio.create_task(_fetch(sub, share, wait_s))
            await asyncio.wait(
                self._inflight.values(), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
        self._harvest()
        return self._hand_out(n)

    def _carried(self) -> bool:
        self._harvest()
        return any(self._carry)

    def _harvest(self) -> None:
        """Move finished fetches' messages to the carry; raise the first failure."""
        failure: BaseException | None = None
        for i, task in list(self._inflight.items()):
            if not task.done():
                continue
            del self._inflight[i]
            if task.cancelled():
                continue
            if (exc := task.exception()) is not None:
                failure = failure or exc
                continue
            self._carry[i].extend(task.result())
        if failure is not None:
            raise failure

    def _hand_out(self, n: int) -> list[Msg]:
        """Round-robin over the partitions' carries, from a start that rotates."""
        out: list[Msg] = []
        order = [(self._start + k) % len(self.subs) for k in range(len(self.subs))]
        self._start = (self._start + 1) % len(self.subs)
        while len(out) < n and any(self._carry):
            for i in order:
                if self._carry[i] and len(out) < n:
                    out.append(self._carry[i].popleft())
                    self.taken[i] += 1
        return out

    async def close(self) -> int:
        """Stop: NAK what is held unread (carried or buffered by nats.py), so another
        replica takes it now, and unsubscribe. Returns how many were given back."""
        for task in self._inflight.values():
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._inflight.clear()
        given = 0
        for carry in self._carry:
            while carry:
                with contextlib.suppress(Exception):
                    await carry.popleft().nak()
                    given += 1
        for sub in self.subs:
            given += await give_back_buffered(sub)
        return given


async def _fetch(sub: PullSub, n: int, wait_s: float) -> list[Msg]:
    try:
        return await sub.fetch(n, timeout=wait_s)
    except (NatsTimeoutError, TimeoutError):
        return []


async def bind_lane(js: JetStreamContext, names: list[StageNames], lane: Lane) -> FairPull:
    """Bind to `lane`'s durable in each partition (created by ensure_streams)."""
    subs = [await js.pull_subscribe_bind(durable=n.consumer(lane), stream=n.stream) for n in names]
    return FairPull(subs)


__all__ = ["FairPull", "bind_lane"]
