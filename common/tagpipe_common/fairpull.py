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

What is held that way was delivered, and its ack wait runs, but the worker may not
ask again for a long time: real-time work keeps it off this (bulk) lane, or every
slot is busy. So while anything is held its lease is renewed (`in_progress`,
which does not count a delivery, as a NAK would) every third of the consumers'
ack wait: without that it would be delivered again, to be worked twice, and
could reach MaxDeliver in a queue. Stopping gives it back (`close`).
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

# The longest `close` waits for fetches in flight to end by themselves.
CLOSE_WAIT_S = 2.0
DEFAULT_ACK_WAIT_S = 30.0  # JetStream's, until the consumers' own is read


class FairPull:
    """Fetch from N pull subscriptions (one lane's consumer in each partition)."""

    def __init__(self, subs: list[PullSub]) -> None:
        if not subs:
            raise ValueError("FairPull needs at least one subscription")
        self.subs = subs
        self.renew_s: float | None = None  # a third of the ack wait, read when first needed
        self._inflight: dict[int, asyncio.Task[list[Msg]]] = {}
        self._deadline = 0.0  # loop time by which every fetch in flight has ended
        self._keeper: asyncio.Task[None] | None = None
        self._closing = False  # set by close: the keeper stops on it, not on cancel alone
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
                    self._deadline = max(self._deadline, _now() + wait_s)
            await asyncio.wait(
                self._inflight.values(), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
        self._harvest()
        out = self._hand_out(n)
        if self._keeper is None and (self._inflight or any(self._carry)):
            self._keeper = asyncio.create_task(self._keep())
        return out

    def _held(self) -> list[Msg]:
        """Delivered and not handed out: the carry and finished fetches' messages."""
        held = [m for carry in self._carry for m in carry]
        for task in self._inflight.values():
            if task.done() and not task.cancelled() and task.exception() is None:
                held += task.result()
        return held

    async def _keep(self) -> None:
        """Renew the lease of what is held until nothing is (or `close`)."""
        try:
            while not self._closing and (self._inflight or any(self._carry)):
                await asyncio.sleep(self.renew_s or await self._renew_interval())
                if self._closing:
                    return
                for msg in self._held():
                    with contextlib.suppress(Exception):  # acked meanwhile, or NATS away
                        await msg.in_progress()
        finally:
            self._keeper = None

    async def _renew_interval(self) -> float:
        """A third of the shortest ack wait among the lane's consumers (the same
        policy sets them all); until it can be read, a third of the default."""
        waits = []
        for sub in self.subs:
            with contextlib.suppress(Exception):  # NATS away: try again next time
                waits.append(
                    float((await sub.consumer_info()).config.ack_wait or DEFAULT_ACK_WAIT_S)
                )
        if len(waits) < len(self.subs):
            return DEFAULT_ACK_WAIT_S / 3
        self.renew_s = min(waits) / 3
        return self.renew_s

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
        replica takes it now, and unsubscribe. Returns how many were given back.

        Fetches in flight are let finish first (each ends by its own wait, at most
        CLOSE_WAIT_S here): a cancelled one would drop what it had already
        received, held by nobody until its ack wait ran out."""
        # The keeper may be inside nats.py (a publish, a request) when cancelled,
        # and nats.py swallows CancelledError in places (its flush), so the flag
        # ends its loop and the wait for it is bounded: a close that waited on
        # cancel alone hung once in CI (the keeper renewing every ack wait / 3).
        self._closing = True
        if (keeper := self._keeper) is not None:
            keeper.cancel()
            await asyncio.wait([keeper], timeout=CLOSE_WAIT_S)
        if self._inflight:
            left = min(CLOSE_WAIT_S, self._deadline - _now() + 0.5)
            await asyncio.wait(self._inflight.values(), timeout=max(left, 0.01))
        for task in self._inflight.values():
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        given = 0
        for msg in self._held():
            with contextlib.suppress(Exception):
                await msg.nak()
                given += 1
        self._inflight.clear()
        for carry in self._carry:
            carry.clear()
        for sub in self.subs:
            given += await give_back_buffered(sub)
        return given


def _now() -> float:
    return asyncio.get_running_loop().time()


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
