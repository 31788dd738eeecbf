"""The inference worker: JetStream in, dynamic batches through the model, Redis out.

- One durable pull consumer per lane, shared by every replica. Real-time items
  have their own loop, slots and model thread (collect.py, lanes.py), so they jump
  the bulk queue and never wait for a bulk batch.
- Dynamic batching: up to `max_batch` images, waiting at most `max_wait_ms` after
  the first one arrives for more to join.
- Pipelining: the session runs in its own single thread while the event loop
  fetches, decodes and normalises the next batch, so it never waits on NATS/Redis.
- Compressed frames (`original`, `encoded_crop`) are decoded per batch by the
  configured decoder (GPU or CPU, `decoders.py`); one that will not decode gets
  a decode_error result, the rest of its batch goes on.
- Exactly-once results on at-least-once delivery: results are stored (SET NX in
  `ResultStore`) before any ack; a redelivered item's duplicate is acked, not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from redis.exceptions import RedisError
from tagpipe_common.errors import ErrorCode
from tagpipe_common.fairpull import bind_lane
from tagpipe_common.messages import TagResult
from tagpipe_common.outage import Outage, is_transient
from tagpipe_common.results import ResultStore
from tagpipe_common.streams import is_final_delivery
from tagpipe_common.subjects import LANES, Lane, Stage, partition_names
from tagpipe_common.tagcache import CacheEntry, ModelIdentity, TagCache
from tagpipe_common.telemetry import log_item_timings
from tagpipe_common.threads import niced_pool

from tagpipe_inference import metrics
from tagpipe_inference.collect import Collector
from tagpipe_inference.decoders import BatchDecoder, DecodeFailed, PillowDecoder, decode_each
from tagpipe_inference.items import Decoded, Rejected, decode, error_result, ok_result, stack
from tagpipe_inference.lanes import ModelThreads, Slots
from tagpipe_inference.model import F32, Model
from tagpipe_inference.settings import InferenceSettings
from tagpipe_inference.spans import BatchTrace

log = logging.getLogger(__name__)


Item = tuple[Msg, Decoded]


@dataclass
class Batch:
    msgs: list[Msg]
    fetched_at: float
    good: list[Item] = field(default_factory=list)
    bad: list[tuple[Msg, Rejected]] = field(default_factory=list)
    expired: list[Item] = field(default_factory=list)  # caller gave up
    remember: list[CacheEntry] = field(default_factory=list)  # tags for the content cache
    trace: BatchTrace = field(default_factory=BatchTrace)


class StoreUnavailable(RuntimeError):
    """Redis stayed unreachable for the whole retry window."""


class InferenceWorker:
    def __init__(
        self,
        settings: InferenceSettings,
        model: Model,
        js: JetStreamContext,
        store: ResultStore,
        decoder: BatchDecoder | None = None,
        threads: ModelThreads | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        pre = model.manifest.preprocess
        self._cpu_decoder = PillowDecoder(pre.resize, pre.crop)
        self.decoder = decoder or self._cpu_decoder
        self.js = js
        self.store = store
        ttl = settings.content_dedupe_ttl_s
        self.cache = TagCache(store.redis, store.keys, ModelIdentity.of(model.manifest), ttl)
        self.batches = 0  # batches that reached the model (tests assert on it)
        self.items = 0
        self.duplicates = 0
        self._stopping = asyncio.Event()
        # Real-time batches have their own model thread and slot (lanes.py); bulk
        # batches and forwarded bulk originals run below the real-time work's priority.
        # `threads` holds each lane's model when they were loaded apart (ModelThreads.load).
        if threads is None:
            threads = ModelThreads(settings.bulk_decode_nice)
            threads.use(model)
        self._threads = threads
        self._bulk_decodes = niced_pool(settings.pipeline_depth, settings.bulk_decode_nice)
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = Slots(settings.pipeline_depth)
        # A JetStream outage (restart, leader change) is waited out, never fatal.
        self.outage = Outage("jetstream", log)
        self._collector = Collector(settings, self._threads, self.outage, self._stopping)

    async def subscribe(self) -> None:
        names = partition_names(Stage.INFER, self.settings.prefix, self.settings.partitions)
        self._collector.lanes = [await bind_lane(self.js, names, lane) for lane in LANES]

    def stop(self) -> None:
        """Stop fetching; the batches in flight are finished and acked."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        if not self._collector.lanes:
            await self.subscribe()
        collect = self._collector
        loops = [self._loop(self._slots.general, collect.bulk_batch)]
        if not self.settings.mix_lanes:  # mixed: one loop, real-time first, shared batches
            loops.append(self._loop(self._slots.realtime, collect.realtime_batch))
        tasks = [asyncio.create_task(loop) for loop in loops]
        try:
            await asyncio.gather(*tasks)
        finally:
            self._stopping.set()  # every loop, however one ended
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)
            if given := await collect.close():
                log.info("gave back %d buffered messages", given)
            self._threads.shutdown()
            self._bulk_decodes.shutdown(wait=True)

    async def _loop(
        self, slots: asyncio.Semaphore, collect: Callable[[], Awaitable[list[Msg]]]
    ) -> None:
        """Fill batches while a slot is free (collect.py: the two loops)."""
        while not self._stopping.is_set():
            await slots.acquire()
            msgs = await collect()
            if not msgs:
                slots.release()
                continue
            task = asyncio.create_task(self._handle(msgs, slots))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    # -- one batch ----------------------------------------------------------------

    async def _handle(self, msgs: list[Msg], slot: asyncio.Semaphore) -> None:
        metrics.INFLIGHT.inc(len(msgs))
        try:
            await self._process(Batch(msgs, fetched_at=time.time()))
        except Exception as exc:
            if is_transient(exc):  # an ack lost to a broker restart: one line per episode
                self.outage.failed(exc)
            else:
                log.exception("batch failed; its messages will be redelivered")
            for m in msgs:
                with contextlib.suppress(Exception):
                    await m.nak(delay=self.settings.nak_delay_s)
        finally:
            metrics.INFLIGHT.dec(len(msgs))
            slot.release()

    async def _process(self, batch: Batch) -> None:
        crop = self.model.manifest.preprocess.crop
        for m in batch.msgs:
            d = decode(m.data, crop)
            if isinstance(d, Decoded) and d.task.expired(batch.fetched_at):
                batch.expired.append((m, d))  # no model time for a caller who left
            elif isinstance(d, Decoded):
                batch.good.append((m, d))
                batch.trace.add(d.task.item_id, m.headers)
                t = d.task
                batch.trace.queue_wait(t.item_id, t.lane.value, t.enqueued_at, batch.fetched_at)
            else:
                batch.bad.append((m, d))
                if d.ref is not None:
                    batch.trace.add(d.ref.item_id, m.headers)
        if any(d.needs_decode for _, d in batch.good):
            await self._decode(batch)
        results: list[tuple[Msg, TagResult]] = self._rejections(batch)
        to_nak: list[Msg] = []
        if batch.good:
            ok, to_nak = await self._infer(batch)
            results += ok
        if results:
            await self._store([r for _, r in results], batch.msgs, batch.trace)
        await self._remember(batch.remember)
        if self.settings.crash_before_ack:
            os._exit(3)  # test hook: results are stored, acks never sent
        for m, r in results:
            if r.code == ErrorCode.BAD_TENSOR:
                await m.term()
            else:
                await m.ack()
        for m in to_nak:
            await m.nak(delay=self.settings.nak_delay_s)
        for m, rej in batch.bad:
            if rej.ref is None:
                log.error("dropping an unattributable message: %s", rej.reason)
                await m.term()

    async def _decode(self, batch: Batch) -> None:
        """Fill in the pixels of compressed items; those that fail move to `bad`."""
        todo = [(m, d) for m, d in batch.good if d.needs_decode]
        payloads = [d.task.pixels for _, d in todo]
        crops = [d.task.encoding == "encoded_crop" for _, d in todo]
        bulk = all(d.task.lane is Lane.BULK for _, d in todo)
        out = await asyncio.get_running_loop().run_in_executor(
            self._bulk_decodes if bulk else None,  # None: the loop's, at normal priority
            decode_each,
            self.decoder,
            self._cpu_decoder,
            payloads,
            crops,
        )
        failed = set()
        for (m, d), px in zip(todo, out, strict=True):
            if isinstance(px, DecodeFailed):
                failed.add(id(m))
                batch.bad.append((m, Rejected(d.task, str(px), ErrorCode.DECODE_ERROR)))
            else:
                d.pixels = px
        batch.good = [(m, d) for m, d in batch.good if id(m) not in failed]

    def _rejections(self, batch: Batch) -> list[tuple[Msg, TagResult]]:
        now = time.time()
        out = []
        for m, rej in batch.bad:
            if rej.ref is not None:
                log.warning("%s for %s: %s", rej.code.value, rej.ref.item_id, rej.reason)
                out.append((m, error_result(rej.ref, rej.code, rej.reason, now)))
        late = "the caller's deadline passed before inference"
        for m, d in batch.expired:
            out.append((m, error_result(d.task, ErrorCode.DEADLINE_EXCEEDED, late, now)))
        return out

    async def _infer(self, batch: Batch) -> tuple[list[tuple[Msg, TagResult]], list[Msg]]:
        """Run the good items; returns (results to store, messages to NAK)."""
        realtime = any(d.task.lane is Lane.REALTIME for _, d in batch.good)
        try:
            scores, infer_ms, started = await self._run(realtime, batch.good)
        except Exception as exc:  # onnxruntime's errors are untyped
            log.error("inference failed for a batch of %d: %s", len(batch.good), exc)
            metrics.INFER_FAILURES.inc()
            return self._inference_failed(batch, str(exc))
        ids = [d.task.item_id for _, d in batch.good]
        batch.trace.inference(ids, started, started + infer_ms / 1000.0)
        return self._tagged(batch, scores, infer_ms), []

    async def _run(self, realtime: bool, items: list[Item]) -> tuple[F32, float, float]:
        """(scores, model ms, start time) of one run on the lane's model thread."""
        thread = self._threads.of(realtime)
        with thread.busy():
            pixels = stack([d for _, d in items])
            x = await asyncio.to_thread(thread.model.preprocess, pixels)  # overlaps a run
            return await asyncio.get_running_loop().run_in_executor(
                thread.pool, self._timed_run, thread.model, x
            )

    def _tagged(self, batch: Batch, scores: F32, infer_ms: float) -> list[tuple[Msg, TagResult]]:
        items = batch.good
        self.batches += 1
        self.items += len(items)
        metrics.BATCHES.inc()
        metrics.BATCH_SIZE.observe(len(items))
        metrics.BATCH_SECONDS.observe(infer_ms / 1000.0)
        log.info(
            "batch done",
            extra={"fields": {"event": "batch", "size": len(items), "inference_ms": infer_ms}},
        )
        done = time.time()
        out = []
        for (m, d), row in zip(items, scores, strict=True):
            opts = d.task.options
            tags = self.model.top_k(row, opts.top_k, opts.min_score)
            result = ok_result(
                d.task,
                tags,
                model=self.model.name,
                version=self.model.version,
                fetched_at=batch.fetched_at,
                inference_ms=infer_ms,
                finished_at=done,
            )
            out.append((m, result))
            if d.task.content_sha256 is not None:  # the downloader dedupes: keep unfiltered tags
                full = tags if opts.min_score == 0 else self.model.top_k(row, opts.top_k)
                batch.remember.append(CacheEntry(d.task.content_sha256, opts.top_k, full))
        return out

    async def _remember(self, entries: list[CacheEntry]) -> None:
        """After the results are stored: a lost entry only costs a later cache miss,
        so Redis trouble here is logged, never retried, never fails the batch."""
        try:
            await self.cache.put_many(entries)
        except (RedisError, OSError) as exc:
            log.warning("tag cache not updated for %d items: %s", len(entries), exc)

    def _timed_run(self, model: Model, x: F32) -> tuple[F32, float, float]:
        # Timed on the session thread: time queued behind the previous batch is not inference.
        started, t0 = time.time(), time.perf_counter()
        scores = model.run_at_most(x, self.settings.max_batch)
        return scores, (time.perf_counter() - t0) * 1000.0, started

    def _inference_failed(
        self, batch: Batch, reason: str
    ) -> tuple[list[tuple[Msg, TagResult]], list[Msg]]:
        final, retry = [], []
        now = time.time()
        for m, d in batch.good:
            if is_final_delivery(m, self.settings.max_deliver):
                msg = f"inference failed on every delivery: {reason}"
                final.append((m, error_result(d.task, ErrorCode.INFERENCE_ERROR, msg, now)))
            else:
                retry.append(m)
        return final, retry

    async def _store(self, results: list[TagResult], msgs: list[Msg], trace: BatchTrace) -> None:
        """One pipeline per batch. While Redis is away, retry with backoff and keep the
        messages' leases alive: NAKing would burn deliveries, and an outage longer than
        max_deliver attempts would strand items (a SIGTERM meanwhile NAKs them)."""
        delay, touched = 0.1, time.monotonic()
        failures = 0
        while True:
            try:
                t0 = time.time()
                firsts = await self.store.record_many(results)
                trace.result_write([r.item_id for r in results], t0, time.time())
                break
            except (RedisError, OSError) as exc:
                if self._stopping.is_set():
                    raise StoreUnavailable(f"result store unavailable: {exc}") from exc
                failures += 1
                metrics.STORE_RETRIES.inc()
                if failures == 1 or failures % 20 == 0:
                    log.warning("result store unavailable (%d tries), retrying: %s", failures, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.store_backoff_max_s)
                if time.monotonic() - touched > self.settings.ack_wait_s / 3:
                    for m in msgs:
                        await m.in_progress()  # resets ack_wait, costs no delivery
                    touched = time.monotonic()
        for r, first in zip(results, firsts, strict=True):
            if not first:
                self.duplicates += 1
                metrics.DUPLICATES.inc()
                log.info("duplicate result for %s ignored (redelivery)", r.item_id)
                continue
            metrics.RESULTS.labels(r.status, r.code or "").inc()
            log_item_timings(
                log,
                {
                    "item_id": r.item_id,
                    "request_id": r.request_id,
                    "job_id": r.job_id,
                    "status": r.status,
                    "code": r.code,
                    **r.timings.model_dump(exclude_none=True),
                },
                context=trace.context(r.item_id),
            )
