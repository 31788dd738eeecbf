"""Publishing a bulk job's items: paced, resumable by any gateway replica.

The upload is stored as a Redis Stream of item batches. One gateway at a time
holds the job's lease and publishes batch after batch, checkpointing the last
published batch in the job hash. If it dies, its lease expires and another
gateway (or the same one restarted) resumes from the checkpoint. Item ids are
deterministic, so re-publishing the batch that was in flight is harmless:
JetStream drops duplicates by Nats-Msg-Id and the result store keeps the first
result of an item.

Pacing: batches of `bulk_batch_size` publishes in flight, paused while the
pipeline backlog is above what it drains in `bulk_target_wait_s` at its measured
rate (`admission.bulk_limit`, never below `bulk_backlog_limit`), so the queue
follows the fleet's size and a million-item job still cannot flood the streams.

Duplicates: a repeated client item id is the same item (dropped, `total`
lowered). A URL seen earlier in the job is not fetched again: that item ends at
once as error `duplicate_url` whose message names the first item.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar, cast

from redis.asyncio import Redis
from tagpipe_common import keys as K
from tagpipe_common import telemetry
from tagpipe_common.errors import ErrorCode
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import DownloadTask, TagResult, TaskOptions
from tagpipe_common.outage import TRANSIENT_NATS_ERRORS, Outage
from tagpipe_common.results import ResultStore
from tagpipe_common.subjects import Lane

from tagpipe_gateway.admission import bulk_limit
from tagpipe_gateway.lease import Leases
from tagpipe_gateway.metrics import BACKPRESSURE
from tagpipe_gateway.queue import BacklogCache, Publisher
from tagpipe_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
_tracer = telemetry.tracer("tagpipe_gateway")

# Leave `submitting` once everything is published; complete at once if every
# item already finished (the ResultStore script only completes running jobs). A job
# with an output is completed by its sink only, once `_manifest.json` is written.
_FINISH_LUA = """
local s = redis.call('HGET', KEYS[1], 'state')
redis.call('SREM', KEYS[2], ARGV[2])
if s ~= 'submitting' then return s end
redis.call('HSET', KEYS[1], 'state', 'running')
local h = redis.call('HMGET', KEYS[1], 'total', 'done', 'failed', 'cancelled', 'output')
local finished = (tonumber(h[2]) or 0) + (tonumber(h[3]) or 0) + (tonumber(h[4]) or 0)
if finished >= (tonumber(h[1]) or 0) and not h[5] then
  redis.call('HSET', KEYS[1], 'state', 'completed', 'finished_at', ARGV[1])
  return 'completed'
end
return 'running'
"""

T = TypeVar("T")


async def aw(value: Awaitable[T] | T) -> T:
    """redis-py types commands as `Awaitable[T] | T`; the asyncio client's are awaitables."""
    return await cast(Awaitable[T], value)


def text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def item_id_for(job_id: str, client_id: str | None, index: int) -> str:
    if client_id is None:
        return f"{job_id}-n{index}"
    return f"{job_id}-c{hashlib.sha256(client_id.encode()).hexdigest()[:24]}"


def _url_field(url: str) -> str:
    return "u:" + hashlib.sha256(url.encode()).hexdigest()[:24]


class Submitter:
    def __init__(
        self,
        redis: Redis,
        store: ResultStore,
        keys: RedisKeys,
        publisher: Publisher,
        backlog: BacklogCache,
        settings: GatewaySettings,
    ) -> None:
        self.redis, self.store, self.keys = redis, store, keys
        self.publisher, self.backlog, self.s = publisher, backlog, settings
        self.lease = Leases(redis, keys.job_lease, settings.lease_s)  # publishing a job
        self._finish = redis.register_script(_FINISH_LUA)
        # JetStream away (restart, leader change): publishing waits it out, lease held.
        self.outage = Outage("jetstream (job submission)", log)

    async def append(self, job_id: str, start: int, items: list[list[str | None]]) -> None:
        """Store one uploaded batch (the intake's sink)."""
        key = self.keys.job_items(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"s": start, "b": json.dumps(items, separators=(",", ":"))})
            pipe.expire(key, self.s.job_ttl_s)
            await pipe.execute()

    async def discard(self, job_id: str) -> None:
        await self.redis.delete(self.keys.job_items(job_id))

    async def acquire(self, job_id: str) -> bool:
        return await self.lease.acquire(job_id)

    async def release(self, job_id: str) -> None:
        """Give the job up at shutdown, so another gateway resumes it without waiting."""
        await self.lease.release(job_id)

    async def _keep_lease(self, job_id: str) -> None:
        await self.lease.keep(job_id)

    async def run(self, job_id: str) -> str:
        """Publish every item not yet published; returns the job state afterwards."""
        token = telemetry.job_id_var.set(job_id)
        try:
            with _tracer.start_as_current_span("submit_job", attributes={"tagpipe.job_id": job_id}):
                return await self._run(job_id)
        finally:
            telemetry.job_id_var.reset(token)

    async def _run(self, job_id: str) -> str:
        job = self.keys.job(job_id)
        raw = await aw(self.redis.hmget(job, [K.JOB_OPTIONS, K.JOB_SUBMIT_CURSOR]))
        options = TaskOptions.model_validate_json(raw[0] or b"{}")
        cursor = text(raw[1]) if raw[1] else "0-0"
        while True:
            entries = await self.redis.xrange(
                self.keys.job_items(job_id), min=f"({cursor}", count=1
            )
            if not entries:
                break
            entry_id, fields = entries[0]
            start = int(fields[b"s"])
            items: list[list[str | None]] = json.loads(fields[b"b"])
            if not await self._submit_batch(job_id, start, items, options):
                break  # cancelled: the rest is never published (and counts as cancelled)
            cursor = text(entry_id)
            await aw(
                self.redis.hset(
                    job, mapping={K.JOB_SUBMIT_CURSOR: cursor, K.JOB_SUBMITTED: start + len(items)}
                )
            )
        args: list[str | float] = [time.time(), job_id]
        state = text(await self._finish(keys=[job, self.keys.submitting_jobs], args=args))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.job_items(job_id), self.keys.job_lease(job_id))
            await pipe.execute()
        return state

    async def _submit_batch(
        self, job_id: str, start: int, items: list[list[str | None]], options: TaskOptions
    ) -> bool:
        """Publish one batch; False (nothing published) once the job is cancelled."""
        tasks = [
            DownloadTask(
                item_id=item_id_for(job_id, cid, start + k),
                job_id=job_id,
                client_item_id=cid,
                lane=Lane.BULK,
                url=url,
                options=options,
            )
            for k, (url, cid) in enumerate(items)
        ]
        if await self._wait_for_room(job_id) == K.JOB_STATE_CANCELLED:
            # No result per item: a cancelled job counts those without one as cancelled.
            return False
        fresh, dups = await self._dedupe(job_id, start, tasks)
        if dups:
            await self.store.record_many(dups)
        await self._publish(job_id, fresh)
        self.backlog.note_published(len(fresh))
        return True

    async def _publish(self, job_id: str, tasks: list[DownloadTask]) -> None:
        """Publish a batch, again whole after a transient failure: the items' Msg-Ids
        make the repeats of the part that did land no-ops."""
        while True:
            try:
                await self.publisher.publish_many(tasks)
            except TRANSIENT_NATS_ERRORS as exc:
                await self.outage.pause(exc)
                await self._keep_lease(job_id)
                continue
            self.outage.ok()
            return

    async def _wait_for_room(self, job_id: str) -> str:
        """Pause while the pipeline backlog is above the bulk limit (`bulk_limit`);
        returns the job state."""
        paused = False
        while True:
            await self._keep_lease(job_id)
            state = text(await aw(self.redis.hget(self.keys.job(job_id), K.JOB_STATE)))
            if state == K.JOB_STATE_CANCELLED:
                return state
            try:
                backlog = await self.backlog.get()
            except TRANSIENT_NATS_ERRORS as exc:
                await self.outage.pause(exc)
                continue
            self.outage.ok()
            limit = bulk_limit(
                self.backlog.drain.rate, self.s.bulk_target_wait_s, self.s.bulk_backlog_limit
            )
            if backlog <= limit:
                return state
            if not paused:
                BACKPRESSURE.labels("bulk_pause").inc()
                paused = True
            await asyncio.sleep(max(self.s.backlog_cache_s, 0.2))

    async def _dedupe(
        self, job_id: str, start: int, tasks: list[DownloadTask]
    ) -> tuple[list[DownloadTask], list[TagResult]]:
        """Split a batch into items to publish and `duplicate_url` results.

        Marks record who set them (line index, item id), so a batch replayed
        after a crash recognises its own marks instead of calling itself a
        duplicate. Only items with a client id can repeat, so only they get one.
        """
        key = self.keys.job_urls(job_id)
        marks: dict[str, str] = {}
        for k, t in enumerate(tasks):
            if t.client_item_id is not None:
                marks.setdefault("i:" + t.item_id, str(start + k))
            marks.setdefault(_url_field(t.url or ""), t.item_id)
        owners = await self._claim(key, marks)
        fresh, dup_urls, repeats = [], [], []
        for k, t in enumerate(tasks):
            if t.client_item_id is not None and owners["i:" + t.item_id] != str(start + k):
                repeats.append(start + k)
                continue
            first = owners[_url_field(t.url or "")]
            if first == t.item_id:
                fresh.append(t)
            else:
                dup_urls.append((t, first))
        await self._drop_repeats(job_id, key, repeats)
        results = [
            TagResult.error(
                t,
                ErrorCode.DUPLICATE_URL,
                f"same URL as item {first} of this job; read that item's result",
                source=t.url,
            )
            for t, first in dup_urls
        ]
        return fresh, results

    async def _claim(self, key: str, marks: dict[str, str]) -> dict[str, str]:
        """HSETNX every mark; returns each field's holder (ours where we won)."""
        fields = list(marks)
        async with self.redis.pipeline(transaction=False) as pipe:
            for f in fields:
                pipe.hsetnx(key, f, marks[f])
            pipe.expire(key, self.s.job_ttl_s)
            won = (await pipe.execute())[:-1]
        owners = dict(marks)
        lost = [f for f, ok in zip(fields, won, strict=True) if not ok]
        if lost:
            held = await aw(self.redis.hmget(key, lost))
            owners.update({f: text(v) for f, v in zip(lost, held, strict=True)})
        return owners

    async def _drop_repeats(self, job_id: str, key: str, repeats: list[int]) -> None:
        """Lower `total` once per repeated line, even if the batch is replayed."""
        if not repeats:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for index in repeats:
                pipe.hsetnx(key, f"r:{index}", "1")
            new = sum(bool(x) for x in await pipe.execute())
        if new:
            await aw(self.redis.hincrby(self.keys.job(job_id), K.JOB_TOTAL, -new))

    async def orphans(self) -> list[str]:
        """Jobs still being submitted whose lease has expired (their gateway died)."""
        members = await aw(self.redis.smembers(self.keys.submitting_jobs))
        found = []
        for raw in members:
            job_id = text(raw)
            if await self.acquire(job_id):
                found.append(job_id)
        return found
