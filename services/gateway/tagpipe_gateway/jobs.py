"""Bulk jobs: creation, background submission (see submit.py), status, cancel,
and the resumable result stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from tagpipe_common import keys as K
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import TagResult, TaskOptions
from tagpipe_common.nats_io import cancel_until_done
from tagpipe_common.outage import describe, is_transient
from tagpipe_common.redis_io import XREAD_BLOCK_MS
from tagpipe_common.results import ResultStore

from tagpipe_gateway.lease import LeaseLost
from tagpipe_gateway.manifest import ManifestReader
from tagpipe_gateway.metrics import observe_item
from tagpipe_gateway.queue import BacklogCache, Publisher
from tagpipe_gateway.schemas import JobStatus
from tagpipe_gateway.settings import GatewaySettings
from tagpipe_gateway.submit import Submitter, aw, text
from tagpipe_gateway.webhook import Webhooks, notify_from_hash

log = logging.getLogger(__name__)

# Cancel writes nothing per item: the job ends now (`finished_at`), workers drop its
# remaining items without a result, and a read counts every item without a result
# as cancelled (`status_from_hash`). Items already past the downloader may still
# finish and count as done or failed. The webhook watch (webhook.py) is told at once.
_CANCEL_LUA = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return false end
if s == 'completed' or s == 'cancelled' then return s end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancelled_at', ARGV[1])
redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[1])
redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[2])
return 'cancelled'
"""

FINAL_STATES = (K.JOB_STATE_COMPLETED, K.JOB_STATE_CANCELLED)
CLOSE_TIMEOUT_S = 5.0
RECENT_JOBS = 100


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
        self.keys = keys
        self.settings = settings
        self.submitter = Submitter(redis, store, keys, publisher, backlog, settings)
        self.manifests = ManifestReader(self.submitter)  # manifest jobs' items (manifest.py)
        self._cancel = redis.register_script(_CANCEL_LUA)
        self.webhooks = Webhooks(redis, keys, settings, self.status)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Jobs fully submitted and followed for metrics and expiry: their last result read.
        self._tailing: dict[str, str] = {}
        self._recover_task: asyncio.Task[None] | None = None

    async def create(
        self,
        job_id: str,
        total: int | None,
        options: TaskOptions,
        owner: str,
        notify_url: str | None = None,
        extra: Mapping[str, str | int] | None = None,
        *,
        idempotency: str | None = None,
    ) -> None:
        """Store a new job. `total` None: not known yet (a manifest still being read;
        its reader sets it). `extra`: more hash fields (a manifest job's). With
        `idempotency` (its key's Redis key), the key maps to the job for exactly as
        long as the job's hash lives."""
        key = self.keys.job(job_id)
        now = time.time()
        fields: dict[str, str | int | float] = {
            K.JOB_DONE: 0,
            K.JOB_FAILED: 0,
            K.JOB_CANCELLED: 0,
            K.JOB_SUBMITTED: 0,
            K.JOB_STATE: K.JOB_STATE_SUBMITTING,
            K.JOB_CREATED_AT: now,
            K.JOB_OPTIONS: options.model_dump_json(),
            K.JOB_OWNER: owner,
            **(extra or {}),
        }
        if total is not None:
            fields[K.JOB_TOTAL] = total
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.settings.job_ttl_s)
            pipe.sadd(self.keys.submitting_jobs, job_id)
            self.index(pipe, job_id, owner, now)
            if notify_url:
                self.webhooks.watch(pipe, job_id, notify_url)
            if K.JOB_OUTPUT in fields:
                # Its sink follows it from here (sink.py), in the same transaction: a job
                # that never gets a result (no items) still gets its _manifest.json.
                pipe.sadd(self.keys.sinking_jobs, job_id)
            if idempotency is not None:
                pipe.set(idempotency, job_id, ex=self.settings.job_ttl_s)
            await pipe.execute()

    def index(self, pipe: Pipeline, job_id: str, owner: str, created_at: float) -> None:
        """Queue the job's entries in the job lists (a creator's pipeline): the live
        view's newest RECENT_JOBS, and its owner's jobs for `GET /v1/jobs`."""
        pipe.zadd(self.keys.recent_jobs, {job_id: created_at})
        pipe.zremrangebyrank(self.keys.recent_jobs, 0, -RECENT_JOBS - 1)
        mine = self.keys.owner_jobs(owner)
        pipe.zadd(mine, {job_id: created_at})
        # Entries older than any job's hash: gone with their jobs.
        pipe.zremrangebyscore(mine, "-inf", created_at - self.settings.job_ttl_s)
        pipe.expire(mine, self.settings.job_ttl_s)

    def start(self) -> None:
        self._recover_task = asyncio.create_task(self._recover(), name="job-recovery")
        self.webhooks.start()

    async def submit(self, job_id: str) -> None:
        """Publish in the background; the caller has stored the items and created the job."""
        if await self.submitter.acquire(job_id):
            self._spawn(job_id)

    def _spawn(self, job_id: str) -> None:
        if job_id in self._tasks:
            return
        task = asyncio.create_task(self._run(job_id), name=f"submit-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    async def _recover(self) -> None:
        """Pick up jobs whose gateway died mid-submission (their lease expired)."""
        while True:
            try:
                for job_id in await self.submitter.orphans():
                    log.warning("resuming submission of job %s", job_id)
                    self._spawn(job_id)
            except Exception as exc:  # Redis down: try again next round
                log.warning("job recovery scan failed: %s", exc)
            await asyncio.sleep(self.settings.recover_interval_s)

    async def close(self) -> None:
        jobs = list(self._tasks)
        tasks = list(self._tasks.values())
        if self._recover_task is not None:
            tasks.append(self._recover_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            # Again until it ends: on Python 3.11 a cancel that lands inside a wait_for
            # (a publish's ack, a Redis read) can be lost, and shutdown would hang on it.
            await cancel_until_done(task, CLOSE_TIMEOUT_S)
        for job_id in jobs:
            with contextlib.suppress(Exception):  # Redis gone: the lease simply expires
                await self.submitter.release(job_id)
        await self._hand_over_tails()
        await self.webhooks.close()

    async def _hand_over_tails(self) -> None:
        """Give the jobs this gateway was tailing to another one.

        Back in the submitting set with no lease, a tailed job is an orphan to the next
        recovery scan of any gateway, which finds nothing left to publish and tails it
        to the end (metrics, then the expiry of its keys). Without this nobody would:
        only jobs still submitting are recovered.
        """
        tailing, self._tailing = dict(self._tailing), {}
        if not tailing:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for job_id, last in tailing.items():
                    # Where this one stopped: the next counts each result once.
                    pipe.hset(self.keys.job(job_id), K.JOB_TAIL_CURSOR, last)
                pipe.sadd(self.keys.submitting_jobs, *tailing)
                await pipe.execute()
            log.info("handed over tailing of %d job(s): %s", len(tailing), ", ".join(tailing))
        except Exception as exc:  # Redis gone: nobody tails them (their keys expire with the job)
            log.warning("could not hand over tailing of %s: %s", list(tailing), describe(exc))

    async def _run(self, job_id: str) -> None:
        try:
            if await self.manifests.is_manifest(job_id):
                state = await self.manifests.run(job_id)
            else:
                state = await self.submitter.run(job_id)
            log.info("job %s fully submitted; state %s", job_id, state)
            await self._tail(job_id)
        except asyncio.CancelledError:
            raise
        except LeaseLost:
            log.warning("job %s: lease lost; another gateway continues it", job_id)
        except Exception as exc:
            # The lease expires and a gateway resumes the job from its checkpoint.
            if not is_transient(exc):
                log.exception("job %s: submission failed; it will be resumed", job_id)
            else:  # Redis away: expected, no traceback
                log.warning(
                    "job %s: submission paused (%s); it will be resumed", job_id, describe(exc)
                )

    async def _tail(self, job_id: str) -> None:
        """Follow the job's results until it is over: metrics, then its URL marks go."""
        stream = self.keys.job_results(job_id)
        handed = await aw(self.redis.hget(self.keys.job(job_id), K.JOB_TAIL_CURSOR))
        last = self._tailing[job_id] = text(handed) if handed else "0-0"
        while True:
            replies = await self.redis.xread({stream: last}, count=500, block=XREAD_BLOCK_MS)
            for _, entries in replies or []:
                for entry_id, fields in entries:
                    last = self._tailing[job_id] = text(entry_id)
                    with contextlib.suppress(ValueError):
                        observe_item(TagResult.from_json(fields[b"r"]))
            status = await self.status(job_id)
            if status is None or (status.state in FINAL_STATES and not replies):
                break
        self._tailing.pop(job_id, None)
        # The result stream needs no expiry from here: the ResultStore script gives it
        # the job's on every append, so it expires with the job even if this gateway dies.
        await self.redis.delete(self.keys.job_urls(job_id))
        await self.webhooks.due_in(job_id, 0)  # over: its webhook (if any) need not wait

    async def status(self, job_id: str, owner: str | None = None) -> JobStatus | None:
        """None when the job does not exist, or (given `owner`) belongs to another caller."""
        raw = await aw(self.redis.hgetall(self.keys.job(job_id)))
        if not raw:
            return None
        h = {text(k): text(v) for k, v in raw.items()}
        if owner is not None and h.get(K.JOB_OWNER) != owner:
            return None
        return status_from_hash(job_id, h)

    async def cancel(self, job_id: str, owner: str) -> JobStatus | None:
        if await self.status(job_id, owner) is None:
            return None
        keys = [self.keys.job(job_id), self.keys.notify_due]
        state = await self._cancel(keys=keys, args=[time.time(), job_id])
        if state is None:
            return None
        return await self.status(job_id)

    async def iter_results(
        self,
        job_id: str,
        cursor: str | None,
        limit: int | None,
        follow_s: float = 0.0,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[bytes]:
        """NDJSON lines `{"cursor": <stream id>, ...result}` after `cursor` (exclusive).

        With `follow_s`, keeps streaming new results as items finish until the job
        is over, `follow_s` has passed or `stop` is set (the gateway is draining), and
        the client resumes from its last cursor: it never gets half a line.
        """
        stream = self.keys.job_results(job_id)
        start = f"({cursor}" if cursor else "-"
        sent = 0
        deadline = time.monotonic() + follow_s
        while limit is None or sent < limit:
            # Read the state first: results are written with their counters, so
            # a job seen over here has every result in the stream already.
            over = follow_s <= 0 or await self._over(job_id)
            page = 1000 if limit is None else min(1000, limit - sent)
            entries = await self.redis.xrange(stream, min=start, max="+", count=page)
            if not entries:
                if over or time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                    return
                last = start[1:] if start.startswith("(") else "0-0"
                await self.redis.xread({stream: last}, count=1, block=XREAD_BLOCK_MS)
                continue
            for entry_id, fields in entries:
                # Splice the cursor into the stored JSON instead of re-encoding it.
                yield b'{"cursor":"' + entry_id + b'",' + fields[b"r"][1:] + b"\n"
            sent += len(entries)
            start = "(" + text(entries[-1][0])
            if follow_s > 0 and stop is not None and stop.is_set():
                return  # draining: end after a whole page, the cursor says where

    async def _over(self, job_id: str) -> bool:
        status = await self.status(job_id)
        if status is None:
            return True
        return status.state in FINAL_STATES and status.finished >= (status.total or 0)


def status_from_hash(job_id: str, h: dict[str, str]) -> JobStatus:
    """A job's status from its hash (decoded)."""
    done, failed, cancelled = (
        int(h.get(f, 0)) for f in (K.JOB_DONE, K.JOB_FAILED, K.JOB_CANCELLED)
    )
    total = int(h[K.JOB_TOTAL]) if K.JOB_TOTAL in h else None
    state = h.get(K.JOB_STATE, K.JOB_STATE_SUBMITTING)
    if state == K.JOB_STATE_CANCELLED:
        # Every item without a result is cancelled: dropped unpublished, or by its worker.
        # A job cancelled before its total was known has the items it published.
        known = total if total is not None else int(h.get(K.JOB_SUBMITTED, 0))
        total = max(known, done + failed)
        cancelled = total - done - failed
    finished = done + failed + cancelled
    created = float(h.get(K.JOB_CREATED_AT, time.time()))
    ended = float(h[K.JOB_FINISHED_AT]) if K.JOB_FINISHED_AT in h else None
    # The clock stops when the job ends (completed or cancelled alike), so an
    # ended job keeps the rate it ended with; it has no ETA.
    elapsed = max((ended or time.time()) - created, 1e-3)
    # Items worked on per second: a cancel's skipped items are not work done.
    rate = (done + failed) / elapsed if done + failed else None
    eta = None
    if rate and total is not None and state not in FINAL_STATES:
        eta = max(total - finished, 0) / rate
    return JobStatus(
        job_id=job_id,
        state=state,
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
        notify=notify_from_hash(h),
    )
