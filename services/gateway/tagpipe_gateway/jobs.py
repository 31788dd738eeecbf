"""Bulk jobs: paced submission from the spool, status, cancel, result stream.

Submission runs in a background task after the upload is spooled. It publishes
bounded batches on the bulk lane and pauses while the download backlog is above
`bulk_backlog_limit` (lower than the real-time 429 limit), so a million-item
job cannot push real-time traffic into rejections.

Item ids are derived from the job id and the client item id (or the line
number), so a repeated client item id is a no-op. A URL seen earlier in the
same job is not fetched again: that item ends at once as an error result with
code `duplicate_url` whose message names the first item (whose result is the
one to read); it counts as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar, cast

from redis.asyncio import Redis
from tagpipe_common import keys as K
from tagpipe_common.errors import ErrorCode
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import DownloadTask, TagResult, TaskOptions
from tagpipe_common.results import ResultStore
from tagpipe_common.subjects import Lane

from tagpipe_gateway.metrics import BACKPRESSURE, observe_item
from tagpipe_gateway.queue import BacklogCache, Publisher
from tagpipe_gateway.schemas import JobStatus
from tagpipe_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# Leave `submitting` once everything is published; complete at once if every
# item already finished (the ResultStore script only completes running jobs).
_FINISH_LUA = """
local s = redis.call('HGET', KEYS[1], 'state')
if s ~= 'submitting' then return s end
redis.call('HSET', KEYS[1], 'state', 'running')
local h = redis.call('HMGET', KEYS[1], 'total', 'done', 'failed', 'cancelled')
local finished = (tonumber(h[2]) or 0) + (tonumber(h[3]) or 0) + (tonumber(h[4]) or 0)
if finished >= (tonumber(h[1]) or 0) then
  redis.call('HSET', KEYS[1], 'state', 'completed', 'finished_at', ARGV[1])
  return 'completed'
end
return 'running'
"""

_CANCEL_LUA = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return false end
if s == 'completed' or s == 'cancelled' then return s end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancelled_at', ARGV[1])
return 'cancelled'
"""

FINAL_STATES = (K.JOB_STATE_COMPLETED, K.JOB_STATE_CANCELLED)


def item_id_for(job_id: str, client_id: str | None, index: int) -> str:
    if client_id is None:
        return f"{job_id}-n{index}"
    return f"{job_id}-c{hashlib.sha256(client_id.encode()).hexdigest()[:24]}"


def _url_field(url: str) -> str:
    return "u:" + hashlib.sha256(url.encode()).hexdigest()[:24]


T = TypeVar("T")


async def _r(value: Awaitable[T] | T) -> T:
    """redis-py types commands as `Awaitable[T] | T`; the asyncio client's are awaitables."""
    return await cast(Awaitable[T], value)


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class JobManager:
    def __init__(
        self,
        redis: Redis,
        store: ResultStore,
        keys: RedisKeys,
        publisher: Publisher,
        backlog: BacklogCache,
        settings: GatewaySettings,
    ) -> None:
        self.redis = redis
        self.store = store
        self.keys = keys
        self.publisher = publisher
        self.backlog = backlog
        self.settings = settings
        self._finish = redis.register_script(_FINISH_LUA)
        self._cancel = redis.register_script(_CANCEL_LUA)
        self._tasks: set[asyncio.Task[None]] = set()

    async def create(self, job_id: str, total: int, options: TaskOptions) -> None:
        key = self.keys.job(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    K.JOB_TOTAL: total,
                    K.JOB_DONE: 0,
                    K.JOB_FAILED: 0,
                    K.JOB_CANCELLED: 0,
                    K.JOB_SUBMITTED: 0,
                    K.JOB_STATE: K.JOB_STATE_SUBMITTING,
                    K.JOB_CREATED_AT: time.time(),
                    "options": options.model_dump_json(),
                },
            )
            pipe.expire(key, self.settings.job_ttl_s)
            await pipe.execute()

    def start_submission(self, job_id: str, spool: Path, options: TaskOptions) -> None:
        task = asyncio.create_task(self._run(job_id, spool, options), name=f"submit-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self, job_id: str, spool: Path, options: TaskOptions) -> None:
        try:
            await self._submit(job_id, spool, options)
            state = _text(await self._finish(keys=[self.keys.job(job_id)], args=[time.time()]))
            log.info("job %s fully submitted; state %s", job_id, state)
            await self._tail(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A gateway that cannot reach Redis/NATS leaves the job `submitting`.
            log.exception("job %s: submission failed", job_id)
        finally:
            spool.unlink(missing_ok=True)  # noqa: ASYNC240 (one unlink, not worth a thread)

    async def _submit(self, job_id: str, spool: Path, options: TaskOptions) -> None:
        batch: list[DownloadTask] = []
        with spool.open() as lines:
            for index, line in enumerate(lines):
                url, client_id = json.loads(line)
                batch.append(
                    DownloadTask(
                        item_id=item_id_for(job_id, client_id, index),
                        job_id=job_id,
                        client_item_id=client_id,
                        lane=Lane.BULK,
                        url=url,
                        options=options,
                    )
                )
                if len(batch) >= self.settings.bulk_batch_size:
                    await self._submit_batch(job_id, batch)
                    batch = []
        if batch:
            await self._submit_batch(job_id, batch)

    async def _submit_batch(self, job_id: str, batch: list[DownloadTask]) -> None:
        if await self._wait_for_room(job_id) == K.JOB_STATE_CANCELLED:
            # Never published: these items end here, counted as cancelled.
            await self.store.record_many(
                [
                    TagResult.error(t, ErrorCode.CANCELLED, "job cancelled", source=t.url)
                    for t in batch
                ]
            )
            return
        fresh, dups = await self._dedupe(job_id, batch)
        if dups:
            await self.store.record_many(dups)
        await self.publisher.publish_many(fresh)
        self.backlog.note_published(len(fresh))
        await _r(self.redis.hincrby(self.keys.job(job_id), K.JOB_SUBMITTED, len(batch)))

    async def _wait_for_room(self, job_id: str) -> str:
        """Pause while the download backlog is above the bulk limit; returns the job state."""
        paused = False
        while True:
            state = _text(await _r(self.redis.hget(self.keys.job(job_id), K.JOB_STATE)))
            if state == K.JOB_STATE_CANCELLED:
                return state
            if await self.backlog.get() <= self.settings.bulk_backlog_limit:
                return state
            if not paused:
                BACKPRESSURE.labels("bulk_pause").inc()
                paused = True
            await asyncio.sleep(max(self.settings.backlog_cache_s, 0.2))

    async def _dedupe(
        self, job_id: str, batch: list[DownloadTask]
    ) -> tuple[list[DownloadTask], list[TagResult]]:
        """Split a batch into items to publish and `duplicate_url` results.

        A repeated client item id is dropped (and `total` lowered): it is the
        same item, and it gets its one result through the first occurrence.
        """
        key = self.keys.job_urls(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for t in batch:
                pipe.hsetnx(key, "i:" + t.item_id, "1")
                pipe.hsetnx(key, _url_field(t.url or ""), t.item_id)
            pipe.expire(key, self.settings.job_ttl_s)
            replies = await pipe.execute()
        fresh: list[DownloadTask] = []
        dup_urls: list[DownloadTask] = []
        repeats = 0
        for i, t in enumerate(batch):
            new_item, new_url = replies[2 * i], replies[2 * i + 1]
            if not new_item:
                repeats += 1
            elif new_url:
                fresh.append(t)
            else:
                dup_urls.append(t)
        if repeats:
            await _r(self.redis.hincrby(self.keys.job(job_id), K.JOB_TOTAL, -repeats))
        if not dup_urls:
            return fresh, []
        firsts = await _r(self.redis.hmget(key, [_url_field(t.url or "") for t in dup_urls]))
        results = []
        for t, first in zip(dup_urls, firsts, strict=True):
            first_id = _text(first)
            msg = f"same URL as item {first_id} of this job; read that item's result"
            results.append(TagResult.error(t, ErrorCode.DUPLICATE_URL, msg, source=t.url))
        return fresh, results

    async def _tail(self, job_id: str) -> None:
        """Follow the job's results until it is over: metrics, then expiry of its keys."""
        stream = self.keys.job_results(job_id)
        last = "0-0"
        while True:
            replies = await self.redis.xread({stream: last}, count=500, block=1000)
            for _, entries in replies or []:
                for entry_id, fields in entries:
                    last = _text(entry_id)
                    with contextlib.suppress(ValueError):
                        observe_item(TagResult.from_json(fields[b"r"]))
            status = await self.status(job_id)
            if status is None or (status.state in FINAL_STATES and not replies):
                break
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.expire(stream, self.settings.job_ttl_s)
            pipe.delete(self.keys.job_urls(job_id))
            await pipe.execute()

    async def status(self, job_id: str) -> JobStatus | None:
        raw = await _r(self.redis.hgetall(self.keys.job(job_id)))
        if not raw:
            return None
        h = {_text(k): _text(v) for k, v in raw.items()}
        done, failed, cancelled = (
            int(h.get(f, 0)) for f in (K.JOB_DONE, K.JOB_FAILED, K.JOB_CANCELLED)
        )
        finished = done + failed + cancelled
        total = int(h[K.JOB_TOTAL]) if K.JOB_TOTAL in h else None
        created = float(h.get(K.JOB_CREATED_AT, time.time()))
        ended = float(h["finished_at"]) if "finished_at" in h else None
        elapsed = max((ended or time.time()) - created, 1e-3)
        rate = finished / elapsed if finished else None
        eta = None
        if rate and total is not None and h.get(K.JOB_STATE) != K.JOB_STATE_COMPLETED:
            eta = max(total - finished, 0) / rate
        return JobStatus(
            job_id=job_id,
            state=h.get(K.JOB_STATE, K.JOB_STATE_SUBMITTING),
            total=total,
            submitted=int(h.get(K.JOB_SUBMITTED, 0)),
            done=done,
            failed=failed,
            cancelled=cancelled,
            finished=finished,
            rate_per_s=rate,
            eta_s=eta,
            created_at=created,
            finished_at=ended,
        )

    async def cancel(self, job_id: str) -> JobStatus | None:
        state = await self._cancel(keys=[self.keys.job(job_id)], args=[time.time()])
        if state is None:
            return None
        return await self.status(job_id)

    async def iter_results(
        self, job_id: str, cursor: str | None, limit: int | None
    ) -> AsyncIterator[bytes]:
        """NDJSON lines `{"cursor": <stream id>, ...result}` after `cursor` (exclusive)."""
        stream = self.keys.job_results(job_id)
        start = f"({cursor}" if cursor else "-"
        sent = 0
        while limit is None or sent < limit:
            page = 1000 if limit is None else min(1000, limit - sent)
            entries = await self.redis.xrange(stream, min=start, max="+", count=page)
            if not entries:
                return
            for entry_id, fields in entries:
                # Splice the cursor into the stored JSON instead of re-encoding it.
                yield b'{"cursor":"' + entry_id + b'",' + fields[b"r"][1:] + b"\n"
            sent += len(entries)
            start = "(" + _text(entries[-1][0])
