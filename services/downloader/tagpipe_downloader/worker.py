"""The download worker: JetStream download tasks in, preprocessed uint8 crops out.

One message, one outcome: either an InferenceTask is published (and
acknowledged by JetStream) before the download message is acked, or an error
TagResult is written through ResultStore (exactly once, SET NX) before it is
acked. Transient faults NAK with a delay, except on the final delivery, where
they become error results, so no item is left unseen in the stream. When Redis
or NATS themselves are down nothing is acked: the worker retries with backoff
and, past its budget, NAKs so JetStream redelivers later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import nats.errors
import redis.exceptions
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from redis.asyncio import Redis
from tagpipe_common import telemetry
from tagpipe_common.errors import ErrorCode, PermanentError, RetryableError
from tagpipe_common.fairpull import FairPull, bind_lane
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import (
    DownloadTask,
    InferenceTask,
    MessageDecodeError,
    SchemaVersionError,
    StageTimings,
    TagResult,
)
from tagpipe_common.outage import TRANSIENT_NATS_ERRORS, Outage
from tagpipe_common.results import ResultStore
from tagpipe_common.streams import StreamPolicy, delivery_count, is_final_delivery
from tagpipe_common.subjects import (
    HDR_MSG_ID,
    HDR_SCHEMA,
    LANES,
    Lane,
    Stage,
    partition_names,
    partition_of,
)

from tagpipe_downloader import metrics
from tagpipe_downloader.deadline import ItemDeadlines
from tagpipe_downloader.decode import Decoded
from tagpipe_downloader.decode_queue import DecodeQueue
from tagpipe_downloader.dedupe import Dedupe
from tagpipe_downloader.fetch import Fetcher, FetchResult
from tagpipe_downloader.forward import decode_for_gpu
from tagpipe_downloader.hop import crop_decoder
from tagpipe_downloader.jobstates import JobStates
from tagpipe_downloader.settings import DownloaderSettings

log = logging.getLogger("tagpipe.downloader")
T = TypeVar("T")

_INFRA_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    nats.errors.Error,
    TimeoutError,
)

# A failed pull is retried whatever nats-py calls it: the loop must outlive the broker.
_FETCH_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT_NATS_ERRORS, nats.errors.Error)


def redelivery_window_s(s: DownloaderSettings) -> float:
    """The longest a download may still be redelivered after its first delivery ends:
    max deliver x the longest of the download ack wait and the NAK delays."""
    ack_wait = StreamPolicy.from_settings(s).consumer_config(Stage.DOWNLOAD, Lane.BULK).ack_wait
    longest = max(float(ack_wait or s.ack_wait_s), s.retry_after_max_s, s.transient_nak_delay_s)
    return s.max_deliver * longest


def _check_deadline(task: DownloadTask, where: str) -> None:
    """Nobody waits for an item past its deadline: no more work is spent on it."""
    if task.expired():
        raise PermanentError(ErrorCode.DEADLINE_EXCEEDED, f"the caller's deadline passed {where}")


class InfraUnavailable(Exception):
    """Redis or NATS stayed unreachable for the whole retry budget."""


class HoldItem(Exception):
    """Infrastructure unavailable on an item's last delivery: keep it and try again."""


class DownloadWorker:
    def __init__(
        self,
        settings: DownloaderSettings,
        nc: Client,
        redis_client: Redis,
        fetcher: Fetcher,
        pool: ThreadPoolExecutor,
        bulk_pool: ThreadPoolExecutor | None = None,  # bulk decodes' own (lower-priority) threads
    ) -> None:
        self.s = settings
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.redis = redis_client
        self.keys = RedisKeys(settings.prefix)
        self.store = ResultStore.for_settings(redis_client, settings)
        self.deadlines = ItemDeadlines(
            redis_client, self.keys, settings.item_deadline_s, redelivery_window_s(settings)
        )
        self.dedupe = Dedupe.from_settings(settings, redis_client, self.keys)
        self.fetcher = fetcher
        self.pool = pool
        lane_pools = {Lane.BULK: bulk_pool} if bulk_pool is not None else None
        self.decodes = DecodeQueue(pool, settings.decode_workers, lane_pools)
        self.geometry = settings.geometry()
        # Bytes -> frame, per lane (a real-time item is never forwarded as its file).
        self._decoders = {
            lane: decode_for_gpu
            if settings.decode == "gpu"
            else crop_decoder(settings.hop_encoding, lane is Lane.REALTIME)
            for lane in LANES
        }
        # Every partition's names; an item goes on in the partition it came in.
        self.download = partition_names(Stage.DOWNLOAD, settings.prefix, settings.partitions)
        self.infer = partition_names(Stage.INFER, settings.prefix, settings.partitions)
        self._slots = asyncio.Semaphore(settings.max_inflight)
        self._publishes = asyncio.Semaphore(settings.max_pending_publishes)
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = 0  # slots held; _tasks lags behind until done-callbacks run
        self.jobs = JobStates(self.store.job_state, self._infra, settings.job_state_cache_s)
        self._stopping = asyncio.Event()
        self._flowing: set[Lane] = set()  # lanes whose last fetch returned work
        self.bound = False
        # Broker outages are waited out: one WARNING per episode, /readyz says not ready.
        self.nats_outage = Outage("jetstream", log)
        self.redis_outage = Outage("redis", log)
        self.tracer = telemetry.tracer("tagpipe.downloader")

    # --- lifecycle --------------------------------------------------------------

    def stop(self) -> None:
        """Stop pulling new work; `run` returns once in-flight items are done."""
        self._stopping.set()

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def run(self) -> None:
        subs = await self._bind()
        if subs is None:
            return
        while not self._stopping.is_set():
            await self._slots.acquire()  # pull only what we can start right away
            self._slots.release()
            free = max(1, self.s.max_inflight - self._busy)
            batch = await self._next_batch(subs, min(free, self.s.fetch_batch))
            for msg, lane in batch:
                await self._slots.acquire()
                self._busy += 1
                task = asyncio.create_task(self._guarded(msg, lane))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        if self._tasks:
            log.info("draining %d in-flight items", len(self._tasks))
            _, late = await asyncio.wait(set(self._tasks), timeout=self.s.drain_timeout_s)
            # Unacked, so JetStream redelivers them to another worker after ack_wait.
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for pull in subs.values():
            if given := await pull.close():
                log.info("gave back %d buffered messages", given)

    async def _bind(self) -> dict[Lane, FairPull] | None:
        # Bind to the durables the operator created; never invent a consumer
        # with default (wrong) ack_wait / max_deliver.
        while True:
            try:
                for names in self.download:
                    for lane in LANES:
                        await self.js.consumer_info(names.stream, names.consumer(lane))
                break
            except (nats.errors.Error, TimeoutError) as exc:
                # Not yet created by the operator, or JetStream still starting.
                await self.nats_outage.pause(exc, self._stopping)
                if self._stopping.is_set():
                    return None
        self.nats_outage.ok()
        subs = {lane: await bind_lane(self.js, self.download, lane) for lane in LANES}
        self.bound = True
        return subs

    async def _next_batch(self, subs: dict[Lane, FairPull], n: int) -> list[tuple[Msg, Lane]]:
        """Real-time first: bulk is only asked for when real-time has nothing
        (in any partition: each lane's FairPull visits them all)."""
        for lane in LANES:
            count, wait = self._poll_plan(lane, n)
            try:
                msgs = await subs[lane].fetch(count, wait)
            except (nats.errors.TimeoutError, TimeoutError):
                self._flowing.discard(lane)
                continue
            except _FETCH_ERRORS as exc:
                await self.nats_outage.pause(exc, self._stopping)
                return []
            self.nats_outage.ok()
            if msgs:
                self._flowing.add(lane)
                return [(m, lane) for m in msgs]
            self._flowing.discard(lane)
        return []

    def _poll_plan(self, lane: Lane, n: int) -> tuple[int, float]:
        """(messages to ask for, seconds to wait) on `lane` this round.

        While work flows, peek at real-time and long-poll bulk. Otherwise
        long-poll real-time for ONE message: nats-py's fetch of n lingers until
        n arrive or the poll ends, so an idle real-time item used to sit out a
        bulk (or batch) poll: 117 ms median pull delay, under 1 ms this way.
        """
        peek, poll = 0.02, self.s.lane_poll_s
        if lane is Lane.REALTIME:
            return (n, peek) if self._flowing else (1, poll)
        return n, poll if Lane.BULK in self._flowing else peek

    # --- one message ------------------------------------------------------------

    async def _guarded(self, msg: Msg, lane: Lane) -> None:
        metrics.INFLIGHT.inc()
        try:
            await self._handle(msg, lane)
        except Exception:
            # A bug must not kill the worker; the message is redelivered after ack_wait.
            log.exception("unexpected failure handling a download task")
        finally:
            metrics.INFLIGHT.dec()
            self._busy -= 1
            self._slots.release()

    async def _handle(self, msg: Msg, lane: Lane) -> None:
        try:
            task = DownloadTask.from_json(msg.data)
        except (MessageDecodeError, SchemaVersionError) as exc:
            log.error("unreadable download task, terminating it: %s", exc)
            await msg.term()
            return
        item_token = telemetry.item_id_var.set(task.item_id)
        request_token = telemetry.request_id_var.set(task.request_id)
        job_token = telemetry.job_id_var.set(task.job_id)
        # One line per delivery taken: the poison-item fault test finds its victim here.
        fields = {"event": "taken", "delivery": delivery_count(msg), "lane": lane.value}
        log.debug("took item", extra={"fields": fields})
        keepalive = asyncio.create_task(self._keep_alive(msg))
        ctx = telemetry.extract_context(msg.headers)
        try:
            telemetry.queue_wait_span(self.tracer, "download_queue_wait", task.enqueued_at, ctx)
            with self.tracer.start_as_current_span("download", context=ctx) as span:
                span.set_attribute("tagpipe.item_id", task.item_id)
                while True:
                    try:
                        await self._process(msg, task, lane)
                        break
                    except HoldItem:
                        # _keep_alive goes on extending the lease meanwhile.
                        await asyncio.sleep(self.s.transient_nak_delay_s)
        finally:
            keepalive.cancel()
            telemetry.item_id_var.reset(item_token)
            telemetry.request_id_var.reset(request_token)
            telemetry.job_id_var.reset(job_token)

    async def _keep_alive(self, msg: Msg) -> None:
        """Extend the lease of a slow item instead of letting JetStream redeliver it."""
        while True:
            await asyncio.sleep(self.s.progress_interval_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _process(self, msg: Msg, task: DownloadTask, lane: Lane) -> None:
        timings = StageTimings(download_queue_ms=max(0.0, (time.time() - task.enqueued_at) * 1000))
        try:
            try:
                _check_deadline(task, "before its download")
                if task.job_id is not None and await self.jobs.cancelled(task.job_id):
                    # No result: a cancelled job counts its unfinished items as
                    # cancelled when read, so 10 M items cost no 10 M writes.
                    metrics.ITEMS.labels(lane.value, "skipped_cancelled").inc()
                    await self._ack_skipped(msg, task)
                    return
                data = await self._source_bytes(msg, task, timings)
                metrics.BYTES.observe(len(data))
                seen = await self._infra(lambda: self.dedupe.lookup(task, data, timings))
                if seen.result is not None:  # these bytes were tagged lately: no inference
                    await self._settle(seen.result)
                else:
                    await self._forward(task, lane, data, timings, seen.digest)
            except PermanentError as exc:
                await self._fail(task, exc.code, exc.message, timings)
            except RetryableError as exc:
                if not is_final_delivery(msg, self.s.max_deliver):
                    log.info("transient %s, retrying in %.1fs", exc.code, exc.delay_s)
                    metrics.RETRIES.labels(exc.code).inc()
                    with contextlib.suppress(*_INFRA_ERRORS):
                        await msg.nak(delay=exc.delay_s)
                    return
                await self._fail(task, exc.code, f"{exc.message} (retries exhausted)", timings)
            try:
                await msg.ack()
            except _INFRA_ERRORS as exc:
                # Redelivery is harmless: Msg-Id dedupe and SET NX absorb the repeat.
                self.nats_outage.failed(exc)
                log.info("ack failed (%s); the item will be redelivered", exc)
                return  # keep the blob: the redelivery may still need it
            await self._drop_blob(task)
        except InfraUnavailable as exc:
            if is_final_delivery(msg, self.s.max_deliver) and not self._stopping.is_set():
                # JetStream never delivers a message again after its last delivery:
                # given back now it would sit unseen in the stream for good (and
                # hold a place in a bounded stream), so it is held and retried.
                log.info("infrastructure unavailable on the last delivery, holding: %s", exc)
                raise HoldItem from exc
            # Per item, so INFO: the outage itself was logged once as a WARNING.
            log.info("infrastructure unavailable, leaving the item for redelivery: %s", exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.s.transient_nak_delay_s)

    async def _forward(
        self, task: DownloadTask, lane: Lane, data: bytes, t: StageTimings, digest: str | None
    ) -> None:
        decoded = await self._decode(data, lane)
        t.decode_ms, t.preprocess_ms = decoded.decode_ms, decoded.preprocess_ms
        _check_deadline(task, "before inference")  # spare the inference tier
        await self._infra(lambda: self._publish(task, lane, decoded, t, digest), self.nats_outage)
        metrics.ITEMS.labels(lane.value, "published").inc()
        metrics.observe_timings(t)

    async def _source_bytes(self, msg: Msg, task: DownloadTask, timings: StageTimings) -> bytes:
        if task.url is not None:
            t0 = time.time()
            result = await self._fetch(msg, task.item_id, task.url)
            timings.connect_ms, timings.download_ms = result.connect_ms, result.download_ms
            self._spans(t0, ("dns_connect", result.connect_ms), ("transfer", result.download_ms))
            return result.body
        t0 = time.perf_counter()
        blob = await self._infra(lambda: self.redis.get(self.keys.blob(task.item_id)))
        timings.download_ms = (time.perf_counter() - t0) * 1000
        if blob is None:
            raise PermanentError(ErrorCode.BLOB_MISSING, "uploaded bytes expired or missing")
        if len(blob) > self.s.max_bytes:
            raise PermanentError(ErrorCode.TOO_LARGE, f"upload over {self.s.max_bytes} bytes")
        return bytes(blob)

    async def _fetch(self, msg: Msg, item_id: str, url: str) -> FetchResult:
        """Fetch within the item's deadline, which its next delivery continues."""
        delivery = delivery_count(msg)
        deadline = await self._infra(lambda: self.deadlines.deadline(item_id, delivery))
        try:
            return await self.fetcher.fetch(url, deadline)
        except RetryableError:
            await self._infra(lambda: self.deadlines.keep(item_id, deadline))
            raise

    async def _decode(self, data: bytes, lane: Lane) -> Decoded:
        # Lane-ordered: a real-time item takes the next free decode thread.
        fn = self._decoders[lane]
        decoded = await self.decodes.run(lane, fn, data, self.geometry, self.s.max_pixels)
        t0 = time.time() - (decoded.decode_ms + decoded.preprocess_ms) / 1000
        self._spans(t0, ("decode", decoded.decode_ms), ("preprocess", decoded.preprocess_ms))
        return decoded

    def _spans(self, t0: float, *steps: tuple[str, float]) -> None:
        """Back-to-back spans from `t0` (epoch s) for steps timed in ms elsewhere."""
        for name, ms in steps:
            telemetry.record_span(self.tracer, name, t0, t0 + ms / 1000)
            t0 += ms / 1000

    async def _publish(
        self,
        task: DownloadTask,
        lane: Lane,
        decoded: Decoded,
        timings: StageTimings,
        digest: str | None = None,
    ) -> None:
        out = InferenceTask(
            **task.ref(),
            **decoded.frame(),
            source=task.source,
            options=task.options,
            timings=timings,
            content_sha256=digest,
        )
        # Msg-Id dedupes a republish after a crash between publish and ack.
        # The publish span's context is what inference's spans hang under.
        with self.tracer.start_as_current_span("publish"):
            headers = telemetry.inject_headers({HDR_MSG_ID: task.item_id, HDR_SCHEMA: str(out.v)})
            async with self._publishes:
                await self.js.publish(
                    self.infer[partition_of(task.item_id, len(self.infer))].subject(lane),
                    out.to_wire(),
                    timeout=self.s.publish_timeout_s,
                    headers=headers,
                )

    async def _fail(self, task: DownloadTask, code: str, message: str, t: StageTimings) -> None:
        await self._settle(TagResult.error(task, code, message, source=task.source, timings=t))

    async def _settle(self, result: TagResult) -> None:
        """Write the result of an item that ends here: an error, or tags from the cache."""
        t, code = result.timings, result.code or "cached"
        # This is the item's last stage: its end to end ends here, as inference's does.
        t.end_to_end_ms = round(max(0.0, time.time() - result.submitted_at) * 1000, 3)
        with self.tracer.start_as_current_span("result_write", attributes={"tagpipe.code": code}):
            first = await self._infra(lambda: self.store.record(result))
        if not first:
            # A redelivered item whose result is already stored: counted and logged once.
            log.info("result already stored (redelivery); not counted again")
            return
        metrics.ITEMS.labels(result.lane.value, code).inc()
        metrics.observe_timings(t)
        fields = {"status": result.status, "code": result.code, "source": result.source}
        telemetry.log_item_timings(log, {**fields, **t.model_dump(exclude_none=True)})

    async def _ack_skipped(self, msg: Msg, task: DownloadTask) -> None:
        """Drop an item of a cancelled job; a failed ack only means a redelivery,
        which is skipped the same way."""
        with contextlib.suppress(*_INFRA_ERRORS):
            await msg.ack()
            await self._drop_blob(task)

    async def _drop_blob(self, task: DownloadTask) -> None:
        if task.blob_key is not None:
            with contextlib.suppress(*_INFRA_ERRORS):
                await self.redis.delete(self.keys.blob(task.item_id))

    async def _infra(self, op: Callable[[], Awaitable[T]], outage: Outage | None = None) -> T:
        """Run a Redis (or, given its outage, NATS) call, retrying with backoff while
        it is unreachable."""
        outage = outage or self.redis_outage
        deadline = time.monotonic() + self.s.infra_retry_budget_s
        while True:
            try:
                result = await op()
            except _INFRA_ERRORS as exc:
                delay = outage.failed(exc)  # logs once per outage, not per item
                if time.monotonic() + delay > deadline or self._stopping.is_set():
                    raise InfraUnavailable(f"{type(exc).__name__}: {exc}") from exc
                metrics.INFRA_RETRIES.inc()
                await asyncio.sleep(delay)
                continue
            outage.ok()
            return result
