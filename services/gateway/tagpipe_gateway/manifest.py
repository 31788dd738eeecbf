"""Manifest jobs: reading a manifest from object storage and publishing its items.

`POST /v1/manifest-jobs` names a manifest (`s3://` or `https://`, gzip allowed);
nothing of it is copied into Redis. One gateway at a time holds the job's lease
(submit.py's, so an orphaned job is resumed the same way) and streams the manifest:
`manifest_chunk_items` lines are parsed in a worker thread, then published under
the bulk backpressure (`Submitter._wait_for_room`) and checkpointed in the job hash
(`read_seq`, `read_offset`). A reader that dies loses at most the chunk in flight:
its successor resumes at the checkpoint (a ranged read; a gzip source is read again
from its start and skipped up to `read_seq`), and re-publishes that chunk under the
same item ids, which JetStream (Msg-Id) and the result store drop as duplicates.
At the end `total` is set and the job leaves `submitting`.

Duplicates: a job may hold a billion lines, so repeated URLs are found in a bounded
window, the last `manifest_dedupe_window` distinct URLs (an 8-byte digest and the
first item's seq, about 110 bytes each: 11 MB for the default 100,000). A repeat
within the window ends as `duplicate_url` naming the first item; a repeat beyond it,
or across a resume (the window starts empty), is fetched again, which the content
cache makes cheap. Repeated client ids are not merged: every line is its own item.

A manifest that becomes unreadable mid-job (deleted, credentials revoked, a corrupt
gzip stream) ends the job where it broke: one more item, at the next seq, ends as
`manifest_unreadable` with the reason. Transient failures (a store outage) leave
the job to be resumed from its checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator
from urllib.parse import urlsplit

from redis.asyncio import Redis
from tagpipe_common import keys as K
from tagpipe_common import objectstore
from tagpipe_common.errors import ErrorCode, PermanentError
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import DownloadTask, ItemRef, TagResult, TaskOptions
from tagpipe_common.netguard import parse_cidrs, resolve_vetted
from tagpipe_common.subjects import Lane

from tagpipe_gateway.manifest_lines import GZIP_MAGIC, Entry, ManifestError, entries, take
from tagpipe_gateway.metrics import BACKPRESSURE
from tagpipe_gateway.submit import Submitter, aw, text

log = logging.getLogger(__name__)

# A source that cannot be read on (unless an ObjectError says "failed": maybe transient).
_UNREADABLE = (objectstore.ObjectError, ManifestError, PermanentError)


class UrlWindow:
    """The last `size` distinct URLs of a job: digest -> seq of the item that had it first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.first: dict[int, int] = {}
        self.order: deque[int] = deque()

    def claim(self, url: str, seq: int) -> int | None:
        """The seq of an earlier item with this URL (within the window), else None."""
        if self.size == 0:
            return None
        digest = int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big")
        if (earlier := self.first.get(digest)) is not None:
            return earlier
        self.first[digest] = seq
        self.order.append(digest)
        if len(self.order) > self.size:
            del self.first[self.order.popleft()]
        return None


def open_source(
    source: str, seq: int, offset: int, dial: str | None = None
) -> tuple[bool, Iterator[bytes]]:
    """(gzip?, the bytes to parse): from `offset` for a plain source, else from 0.

    A checkpoint with an offset is a plain source's; otherwise the first bytes tell
    (gzip's magic), whatever the name says."""
    if offset > 0:
        return False, objectstore.read_stream(source, offset, dial)
    chunks = objectstore.read_stream(source, 0, dial)
    first = next(chunks, b"")
    gz = first.startswith(GZIP_MAGIC) or urlsplit(source).path.endswith(".gz")
    return gz, itertools.chain([first], chunks)


async def vet_https(url: str, allow_cidrs: str, timeout_s: float = 5.0) -> str:
    """The SSRF guard for a manifest the gateway reads: its host must resolve to public
    addresses only (or ones `allow_cidrs` lists). Returns the address to dial (so a
    second DNS answer cannot point the read elsewhere). Raises PermanentError
    (blocked_address, dns_error, invalid_url) or RetryableError."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addrs = await resolve_vetted(host, port, parse_cidrs(allow_cidrs.split(",")), timeout_s)
    return str(addrs[0])


async def sink_has_room(redis: Redis, keys: RedisKeys, job_id: str, max_ready: int) -> bool:
    """Whether at most `max_ready` complete shards of the job wait for the sink. Items
    in flight are bounded by the bulk backpressure; this bounds the lines staged in
    Redis behind them, so a job's Redis peak follows what is in flight, not its size."""
    return int(await aw(redis.scard(keys.job_ready(job_id)))) <= max_ready


class ManifestReader:
    """Publishes a manifest job's items; the Submitter lends its lease and pacing."""

    def __init__(self, submitter: Submitter) -> None:
        self.sub = submitter
        self.redis, self.keys, self.s = submitter.redis, submitter.keys, submitter.s

    async def is_manifest(self, job_id: str) -> bool:
        kind = await aw(self.redis.hget(self.keys.job(job_id), K.JOB_KIND))
        return kind is not None and text(kind) == K.JOB_KIND_MANIFEST

    async def run(self, job_id: str) -> str:
        """Publish every item from the checkpoint on; returns the job state afterwards."""
        job = self.keys.job(job_id)
        fields = [K.JOB_OPTIONS, K.JOB_SOURCE, K.JOB_READ_SEQ, K.JOB_READ_OFFSET]
        raw = await aw(self.redis.hmget(job, fields))
        options = TaskOptions.model_validate_json(raw[0] or b"{}")
        source = text(raw[1])
        seq, offset = int(raw[2] or 0), int(raw[3] or 0)
        window = UrlWindow(self.s.manifest_dedupe_window)
        it: Iterator[Entry] | None = None
        while True:
            await self._wait_for_sink(job_id)
            if await self.sub._wait_for_room(job_id) == K.JOB_STATE_CANCELLED:
                break  # the rest is never published: those items do not exist
            broke: Exception | None = None
            try:
                if it is None:
                    it = await self._open(source, seq, offset)
                batch, broke = await self._take(job_id, it)
            except _UNREADABLE as exc:
                batch, broke = [], exc
            if batch:  # the lines read before a break too: they are items
                await self._publish_chunk(job_id, batch, options, window)
                seq, offset = batch[-1].seq + 1, batch[-1].end
                mapping = {K.JOB_READ_SEQ: seq, K.JOB_READ_OFFSET: offset, K.JOB_SUBMITTED: seq}
                await aw(self.redis.hset(job, mapping=mapping))
            if broke is not None:
                if not isinstance(broke, _UNREADABLE) or (
                    isinstance(broke, objectstore.ObjectError) and broke.kind == "failed"
                ):
                    raise broke  # maybe transient: the job resumes from its checkpoint
                await self._broken(job_id, seq, source, str(broke))
                seq += 1
                break
            if not batch:
                break
        return await self._finish(job_id, seq)

    async def _wait_for_sink(self, job_id: str) -> None:
        """Pause while the sink is behind (`sink_has_room`), holding the lease; a
        cancel ends the pause (the caller then finds the job cancelled)."""
        paused = False
        while not await sink_has_room(self.redis, self.keys, job_id, self.s.sink_max_ready_shards):
            state = await aw(self.redis.hget(self.keys.job(job_id), K.JOB_STATE))
            if state is not None and text(state) == K.JOB_STATE_CANCELLED:
                return
            if not paused:
                BACKPRESSURE.labels("sink_pause").inc()
                paused = True
            await self.sub._keep_lease(job_id)
            await asyncio.sleep(max(self.s.backlog_cache_s, 0.2))

    async def _open(self, source: str, seq: int, offset: int) -> Iterator[Entry]:
        dial = None
        if source.startswith("https://"):
            dial = await vet_https(source, self.s.allow_cidrs)
        gz, chunks = await asyncio.to_thread(open_source, source, seq, offset, dial)
        return entries(chunks, gz, seq, offset, self.s.max_url_length)

    async def _take(self, job_id: str, it: Iterator[Entry]) -> tuple[list[Entry], Exception | None]:
        """The next chunk (and the error that cut it short, if any), read in a worker
        thread; the lease is renewed meanwhile, since a resumed gzip source may first
        skip a long way."""
        work = asyncio.ensure_future(asyncio.to_thread(take, it, self.s.manifest_chunk_items))
        while True:
            done, _ = await asyncio.wait({work}, timeout=self.s.lease_s / 3)
            if done:
                return work.result()
            await self.sub._keep_lease(job_id)

    async def _publish_chunk(
        self, job_id: str, batch: list[Entry], options: TaskOptions, window: UrlWindow
    ) -> None:
        results: list[TagResult] = []
        tasks: list[DownloadTask] = []
        for e in batch:
            ref = ItemRef(item_id=f"{job_id}-n{e.seq}", job_id=job_id,
                          client_item_id=e.client_id, seq=e.seq, lane=Lane.BULK)  # fmt: skip
            if e.url is None:
                why = e.error or "malformed line"
                results.append(TagResult.error(ref, ErrorCode.INVALID_URL, why, source=e.raw))
                continue
            task = DownloadTask(**ref.ref(), url=e.url, options=options)
            if (first := window.claim(e.url, e.seq)) is not None:
                msg = f"same URL as item {job_id}-n{first} of this job; read that item's result"
                results.append(TagResult.error(task, ErrorCode.DUPLICATE_URL, msg, source=e.url))
            else:
                tasks.append(task)
        if results:
            await self.sub.store.record_many(results)
        step = self.s.bulk_batch_size
        for i in range(0, len(tasks), step):
            await self.sub._publish(job_id, tasks[i : i + step])
            self.sub.backlog.note_published(len(tasks[i : i + step]))

    async def _broken(self, job_id: str, seq: int, source: str, why: str) -> None:
        log.warning("job %s: manifest %s unreadable at item %d: %s", job_id, source, seq, why)
        ref = ItemRef(item_id=f"{job_id}-n{seq}", job_id=job_id, seq=seq, lane=Lane.BULK)
        message = f"the manifest cannot be read on from here: {why}"
        code = ErrorCode.MANIFEST_UNREADABLE
        await self.sub.store.record_many([TagResult.error(ref, code, message, source=source)])

    async def _finish(self, job_id: str, total: int) -> str:
        """`total` is known now: leave `submitting` (complete at once if all settled)."""
        job = self.keys.job(job_id)
        await aw(self.redis.hset(job, mapping={K.JOB_TOTAL: total, K.JOB_SUBMITTED: total}))
        args: list[str | float] = [time.time(), job_id]
        state = text(await self.sub._finish(keys=[job, self.keys.submitting_jobs], args=args))
        await self.redis.delete(self.keys.job_lease(job_id))
        return state
