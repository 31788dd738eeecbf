"""How the inference worker makes batches from its lanes (dynamic batching).

Two loops fill batches, each with its own slots (batches in flight) and model
thread (lanes.py):

- the real-time loop has the real-time lane's pull to itself and waits on it (a long
  poll that returns at the first item), so a real-time item is fetched the moment
  it comes, whatever the bulk side is doing. When the bulk side also polled the
  real-time lane, an item that came while it waited for the busy bulk model to top
  up a batch was fetched only when that batch ran: up to a bulk batch's model time
  (300 ms at 32 on 2 cores) in `infer_queue_ms`;
- the bulk loop takes the bulk lane. With `mix_lanes` (a GPU's batch of 8 costs
  about what one does: real-time items may ride with bulk ones there) it is the
  only loop, and takes the real-time lane first.

A batch is closed when its model thread can take it, not when its first item came
(Triton's dynamic batcher does the same): one that finds the thread busy takes what
the lanes hold when it frees.
"""

from __future__ import annotations

import asyncio
import time

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from tagpipe_common.fairpull import FairPull
from tagpipe_common.outage import TRANSIENT_NATS_ERRORS, Outage

from tagpipe_inference.lanes import ModelThreads
from tagpipe_inference.settings import InferenceSettings

# The real-time loop's long poll: it returns at the first item, so this only bounds
# how long a stopping worker waits for it.
REALTIME_POLL_S = 0.5


class Collector:
    def __init__(
        self,
        settings: InferenceSettings,
        threads: ModelThreads,
        outage: Outage,
        stopping: asyncio.Event,
    ) -> None:
        self.s = settings
        self.threads = threads
        self.outage = outage
        self.stopping = stopping
        # One pull per lane, LANES order (real-time, bulk). Without mix_lanes the
        # real-time one is the real-time loop's alone, the bulk one the bulk loop's;
        # with it there is one loop. So no pull is ever fetched from twice at once.
        self.lanes: list[FairPull] = []

    async def fetch(
        self, sub: FairPull, n: int, wait_s: float, ends_outage: bool = True
    ) -> list[Msg]:
        """Up to `n` messages within `wait_s`. A JetStream outage is backed off, and
        reported to the worker's one `Outage`; only the bulk loop (which always polls)
        ends an episode: the real-time loop's long poll, begun before an outage, can
        time out cleanly in it, and would split one outage into two."""
        try:
            msgs = await sub.fetch(n, max(wait_s, 0.001))
        except (TimeoutError, NatsTimeoutError):
            msgs = []  # nothing queued (or a reconnect in progress: nc says which)
        except TRANSIENT_NATS_ERRORS as exc:
            await self.outage.pause(exc, self.stopping)
            return []
        if ends_outage:
            self.outage.ok()
        return msgs

    async def realtime_batch(self) -> list[Msg]:
        """The real-time loop's batch: its first item as soon as it comes (within
        REALTIME_POLL_S), and what the lane holds when the model thread is free."""
        pull = self.lanes[0]
        got = await self.fetch(pull, 1, REALTIME_POLL_S, ends_outage=False)
        if got and self.s.max_batch > 1:
            room = self.s.max_batch - 1
            got += await self._top_up(room, [pull], realtime=True, ends_outage=False)
        return got

    async def bulk_batch(self) -> list[Msg]:
        """Up to max_batch messages from the bulk loop's lanes (real-time first, with
        `mix_lanes`), waiting max_wait after the first (none after a real-time one)."""
        lanes = self.lanes if self.s.mix_lanes else self.lanes[1:]
        max_batch = self.s.max_batch
        max_wait = self.s.max_wait_ms / 1000.0
        peek = self.s.lane_peek_ms / 1000.0
        top_up = self.s.top_up_ms / 1000.0
        got: list[Msg] = []
        deadline: float | None = None
        realtime = False
        peek_only = True  # first peek at every lane, so a busy bulk lane never waits on idle rt
        while len(got) < max_batch and not self.stopping.is_set():
            for sub in lanes:
                need = max_batch - len(got)
                if need <= 0:
                    break
                if deadline is None:
                    wait = peek if peek_only else max(max_wait, peek)
                else:  # what is there by now: at least a reply's time (top_up_ms)
                    wait = max(min(deadline - time.monotonic(), peek), top_up)
                msgs = await self.fetch(sub, need, wait)
                got.extend(msgs)
                if msgs and sub is self.lanes[0]:
                    # Real-time items wait for no batch window (p95 in docs/benchmarks.md).
                    deadline, realtime = time.monotonic(), True
                elif msgs and deadline is None:
                    deadline = time.monotonic() + max_wait
            peek_only = False
            if deadline is not None and time.monotonic() >= deadline:
                break
        if got and len(got) < max_batch and not self.threads.of(realtime).idle.is_set():
            got += await self._top_up(max_batch - len(got), lanes, realtime)
        return got

    async def _top_up(
        self, room: int, lanes: list[FairPull], realtime: bool, ends_outage: bool = True
    ) -> list[Msg]:
        """Wait for the model thread to be free, then take what `lanes` hold by now:
        under load (items arriving one by one while a batch runs) batches of 1-2
        became batches near max_batch, with no item waiting longer than it would
        have for the busy model."""
        await self.threads.of(realtime).idle.wait()
        wait_s = self.s.top_up_ms / 1000.0
        more: list[Msg] = []
        for sub in lanes:  # real-time first, as everywhere
            if room - len(more) <= 0 or self.stopping.is_set():
                break
            more += await self.fetch(sub, room - len(more), wait_s, ends_outage)
        return more

    async def close(self) -> int:
        """Give back what the pulls hold unread; returns how many."""
        given = 0
        for pull in self.lanes:
            given += await pull.close()
        self.lanes = []
        return given
