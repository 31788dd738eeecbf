"""Waiting for real-time results: one Redis subscription per gateway process.

The ResultStore publishes `{item_id, request_id}` on the notify channel when a
result is written. This process holds one subscription and wakes the waiter of
that request. A waiter is registered before its items are published, so a fast
result cannot slip past; results themselves are then read with one MGET.
Pub/sub is fire-and-forget (a reconnect can drop a message), so a waiter also
re-reads the store every `poll_s`, which bounds the cost of a lost notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from tagpipe_common.messages import TagResult
from tagpipe_common.outage import Outage
from tagpipe_common.redis_io import RedisTimeouts
from tagpipe_common.results import ResultStore

log = logging.getLogger(__name__)

_PING_S = 1.0  # how often the subscription proves its server is still there


class Waiter:
    def __init__(self, request_id: str, item_ids: Sequence[str]) -> None:
        self.request_id = request_id
        self.item_ids = list(item_ids)
        self.pending = set(item_ids)
        self.event = asyncio.Event()

    def notify(self, item_id: str) -> None:
        self.pending.discard(item_id)
        if not self.pending:
            self.event.set()


class Notifier:
    def __init__(
        self,
        redis: Redis,
        store: ResultStore,
        channel: str,
        poll_s: float = 1.0,
        dead_after_s: float = RedisTimeouts.socket_timeout_s,
    ):
        self.redis = redis
        self.store = store
        self.channel = channel
        self.poll_s = poll_s
        self.dead_after_s = dead_after_s
        self._waiters: dict[str, Waiter] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.outage = Outage("redis (result notifications)", log, base_s=0.25)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="notifier")
        # Wait for the first SUBSCRIBE so no request can publish before we listen.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 5.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                self.outage.ok()
                try:
                    await self._receive(pubsub)
                finally:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a Redis restart: resubscribe; waiters poll meanwhile
                await self.outage.pause(exc)

    async def _receive(self, pubsub: PubSub) -> None:
        """Dispatch messages until the subscription fails or falls silent.

        A primary that hangs without a TCP reset sends nothing, not even an error:
        `listen()` would wait on it forever (and, bounded by the socket timeout,
        would drop every quiet channel). So PING once a second and take silence
        past `dead_after_s` as a dead connection: the caller resubscribes, through
        Sentinel to the promoted replica, while the waiters poll the store.
        """
        loop = asyncio.get_running_loop()
        heard = pinged = loop.time()
        while True:
            msg = await pubsub.get_message(timeout=_PING_S)
            now = loop.time()
            if msg is not None:
                heard = now  # a pong or a notification: the server is there
                if msg.get("type") == "message":
                    self._dispatch(msg.get("data"))
            if now - heard > self.dead_after_s:
                raise redis.exceptions.TimeoutError(
                    f"no reply on the subscription for {now - heard:.1f} s"
                )
            if now - pinged >= _PING_S:
                await pubsub.ping()
                pinged = now

    def _dispatch(self, data: object) -> None:
        if not isinstance(data, bytes | str):
            return
        try:
            note = json.loads(data)
        except ValueError:
            return
        waiter = self._waiters.get(str(note.get("request_id")))
        if waiter is not None:
            waiter.notify(str(note.get("item_id")))

    def register(self, request_id: str, item_ids: Sequence[str]) -> Waiter:
        waiter = Waiter(request_id, item_ids)
        self._waiters[request_id] = waiter
        return waiter

    def pending_items(self) -> int:
        """Items of the requests waiting here that have no result yet."""
        return sum(len(w.pending) for w in self._waiters.values())

    def unregister(self, waiter: Waiter) -> None:
        self._waiters.pop(waiter.request_id, None)

    async def wait(self, waiter: Waiter, timeout_s: float) -> list[TagResult | None]:
        """Results in item order; None for items still unfinished at the deadline.

        Returns within `timeout_s` + `dead_after_s`, whatever Redis does: a read of
        the store (redis-py retries a dead connection up to 4 times, a socket timeout
        each) may take only the time left, and the last one `dead_after_s`. A read
        cut short counts as no result yet: the caller answers 504 with the request id.
        """
        deadline = time.monotonic() + timeout_s
        nothing: list[TagResult | None] = [None] * len(waiter.item_ids)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.event.wait(), min(remaining, self.poll_s))
                if waiter.event.is_set():
                    break
                # Poll: covers a notification lost to a reconnect.
                results = await self._read(waiter, deadline - time.monotonic())
                if results is not None and all(r is not None for r in results):
                    return results
            return await self._read(waiter, self.dead_after_s) or nothing
        finally:
            self.unregister(waiter)

    async def _read(self, waiter: Waiter, within_s: float) -> list[TagResult | None] | None:
        """The store's results, or None when they take longer than `within_s`."""
        try:
            async with asyncio.timeout(max(within_s, 0.05)):
                return await self.store.get_many(waiter.item_ids)
        except TimeoutError:
            return None
