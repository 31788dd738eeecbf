"""Settle items whose last delivery died with its worker: one `retries_exhausted` each.

A worker that survives an item's final delivery writes its error result itself
(`streams.is_final_delivery`). One that dies on it (OOM, SIGKILL, a poison image)
cannot; JetStream then never delivers the message again and leaves it in the work
stream. Its MAX_DELIVERIES advisory, kept in the advisory stream (advisories.py),
is read here by one of the stage's workers, which, in this order:

0. waits until the advisory is one ack wait old. JetStream sends it when the last
   delivery's ack wait runs out, which a worker that is slow but alive can outlast
   (its event loop stalled, NATS away while it sent its progress): it still ends the
   item and acks, and its result, not retries_exhausted, should stand;
1. reads the message by stream sequence (a work-queue stream keeps it until it
   is acked, deleted or termed); gone: a late ack of the final delivery removed
   it, so that delivery succeeded and nothing is to be done;
2. decodes it (each stage its own message type) and records one
   `retries_exhausted` TagResult through ResultStore. Its exactly-once write
   makes this safe against a final delivery that did succeed after all (a
   frozen worker that resumed): whichever result came first stays;
3. deletes the message from the work stream, so it is never delivered again;
   only after the result is stored, so a failed write loses nothing: the
   advisory is NAKed and handled again later;
4. acks the advisory.

An item of a cancelled job gets no result (the workers skip those too; a read
counts it as cancelled), and its message is deleted all the same. So is a
message that does not decode: with a result where an item id and owner can
still be read from it, else with an ERROR line naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import struct
import time
from collections.abc import AsyncIterator, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter
from pydantic import ValidationError
from redis.exceptions import RedisError

from tagpipe_common import telemetry
from tagpipe_common.advisories import MaxDeliveries, advisory_consumer, advisory_stream
from tagpipe_common.errors import ErrorCode
from tagpipe_common.messages import DownloadTask, InferenceTask, ItemRef, TagResult
from tagpipe_common.results import ResultStore
from tagpipe_common.subjects import Stage

log = logging.getLogger("tagpipe.stranded")

# Stranded items mean workers die on items: worth an alert. On the metrics port of
# whichever worker settled them (downloader or inference).
SETTLED = Counter(
    "tagpipe_stranded_items_total",
    "Messages whose last delivery died with its worker, settled from their advisory, by "
    "stage and outcome (recorded, duplicate, gone, cancelled, undecodable)",
    ["stage", "outcome"],
)

# Each stage reads its own message type; the source is what the result names.
Decode = Callable[[bytes], tuple[ItemRef, str | None]]


def _download(data: bytes) -> tuple[ItemRef, str | None]:
    task = DownloadTask.from_json(data)
    return task, task.source


def _infer(data: bytes) -> tuple[ItemRef, str | None]:
    task = InferenceTask.from_wire(data)
    return task, task.source


DECODERS: dict[Stage, Decode] = {Stage.DOWNLOAD: _download, Stage.INFER: _infer}
_FRAME_MAGIC = b"TPI1"


def loose_ref(data: bytes) -> ItemRef | None:
    """The routing fields of a message that does not decode as its type, if any:
    the JSON body of a download task, or the JSON header of an inference frame."""
    if data.startswith(_FRAME_MAGIC) and len(data) >= 8:
        # messages.py's frame: magic, a big-endian u32 header length, the header.
        (length,) = struct.unpack_from(">I", data, 4)
        data = data[8 : 8 + length]
    with contextlib.suppress(ValueError, TypeError):
        doc = json.loads(data)
        if isinstance(doc, dict):
            doc.pop("v", None)  # a newer schema's item is still this item
            with contextlib.suppress(ValidationError):
                return ItemRef.model_validate(doc)
    return None


class StrandedSweeper:
    """One stage's reader of the advisory consumer; runs beside the stage's worker."""

    def __init__(
        self,
        js: JetStreamContext,
        store: ResultStore,
        stage: Stage,
        prefix: str,
        poll_s: float = 5.0,
        batch: int = 16,
    ) -> None:
        self.js, self.store, self.stage = js, store, stage
        self.stream = advisory_stream(prefix)
        self.durable = advisory_consumer(prefix, stage)
        self.decode = DECODERS[stage]
        self.poll_s, self.batch = poll_s, batch
        self.settled = 0  # items this sweeper wrote a retries_exhausted result for
        self._ack_waits: dict[tuple[str, str], float] = {}  # per work stream and consumer

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop`; a short poll every `poll_s` (jittered), not a standing
        long poll, so hundreds of replicas leave few pull requests waiting."""
        sub: JetStreamContext.PullSubscription | None = None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s * random.uniform(0.5, 1.5))
            if stop.is_set():
                break
            try:
                if sub is None:
                    sub = await self.js.pull_subscribe_bind(self.durable, stream=self.stream)
                await self.sweep(sub)
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                # No advisory stream yet (an older operator), or NATS away: next poll.
                log.debug("stranded-item sweep skipped: %r", exc)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def sweep(self, sub: JetStreamContext.PullSubscription) -> int:
        """Handle what the advisory consumer has now; how many advisories were acked."""
        try:
            msgs = await sub.fetch(self.batch, timeout=1.0)
        except (nats.errors.TimeoutError, TimeoutError):
            return 0
        done = 0
        for msg in msgs:
            done += await self._one(msg)
        return done

    async def _one(self, msg: Msg) -> int:
        advisory = MaxDeliveries.parse(msg.data)
        try:
            if advisory is not None:
                if (wait := await self._grace_left(msg, advisory)) > 0:
                    return await self._later(msg, wait)  # step 0
                await self.settle(advisory)
        except (RedisError, OSError, nats.errors.Error, TimeoutError) as exc:
            log.warning("stranded item not settled yet, retrying later: %r", exc)
            return await self._later(msg)
        except Exception:
            # A bug must not end the sweeper; the advisory stays for a later look.
            log.exception("stranded-item advisory not handled: %r", msg.data[:200])
            return await self._later(msg)
        await msg.ack()
        return 1

    async def _later(self, msg: Msg, delay_s: float | None = None) -> int:
        with contextlib.suppress(Exception):
            await msg.nak(delay=self.poll_s if delay_s is None else delay_s)
        return 0

    async def _grace_left(self, msg: Msg, advisory: MaxDeliveries) -> float:
        """Seconds until the advisory is one ack wait (of the consumer it names) old."""
        key = (advisory.stream, advisory.consumer)
        if key not in self._ack_waits:
            try:
                info = await self.js.consumer_info(advisory.stream, advisory.consumer)
                self._ack_waits[key] = float(info.config.ack_wait or 0.0)
            except NotFoundError:  # the consumer is gone, and its workers with it
                self._ack_waits[key] = 0.0
        sent = msg.metadata.timestamp.timestamp()  # when the advisory was stored
        return sent + self._ack_waits[key] - time.time()

    async def settle(self, advisory: MaxDeliveries) -> str:
        """Steps 1-3 above for one advisory. Returns what happened (for logs, tests)."""
        try:
            raw = await self.js.get_msg(advisory.stream, advisory.stream_seq)
        except NotFoundError:
            SETTLED.labels(self.stage.value, "gone").inc()
            return "gone"  # acked late (that delivery succeeded), or settled already
        data = raw.data or b""
        try:
            ref, source = self.decode(data)
        except ValueError as exc:
            outcome = await self._undecodable(advisory, data, exc)
        else:
            outcome = await self._record(advisory, ref, source)
        with contextlib.suppress(NotFoundError):  # another sweeper was quicker
            await self.js.delete_msg(advisory.stream, advisory.stream_seq)
        SETTLED.labels(self.stage.value, outcome).inc()
        return outcome

    async def _record(self, advisory: MaxDeliveries, ref: ItemRef, source: str | None) -> str:
        if ref.job_id is not None and await self.store.job_state(ref.job_id) == "cancelled":
            # As the workers do: a cancelled job's unfinished items count as
            # cancelled when read, with no result written for them.
            return "cancelled"
        n = advisory.deliveries
        message = (
            f"delivered {n} times ({n} of {n}); the last delivery never finished: "
            f"the {self.stage.value} worker handling it died"
        )
        result = TagResult.error(ref, ErrorCode.RETRIES_EXHAUSTED, message, source=source)
        first = await self.store.record(result)
        token = telemetry.item_id_var.set(ref.item_id)
        try:
            fields = {
                "event": "stranded",
                "stream": advisory.stream,
                "stream_seq": advisory.stream_seq,
                "deliveries": advisory.deliveries,
                "job_id": ref.job_id,
                "first": first,
            }
            log.warning("stranded item settled as retries_exhausted", extra={"fields": fields})
        finally:
            telemetry.item_id_var.reset(token)
        if first:
            self.settled += 1
            return "recorded"
        return "duplicate"

    async def _undecodable(self, advisory: MaxDeliveries, data: bytes, exc: Exception) -> str:
        ref = loose_ref(data)
        if ref is not None:
            await self._record(advisory, ref, None)
            return "undecodable"
        log.error(
            "stranded message without an item id, deleted: %s",
            exc,
            extra={
                "fields": {
                    "stream": advisory.stream,
                    "stream_seq": advisory.stream_seq,
                    "head": data[:200].decode(errors="replace"),
                }
            },
        )
        return "undecodable"


@contextlib.asynccontextmanager
async def sweeping(
    js: JetStreamContext, store: ResultStore, stage: Stage, prefix: str, poll_s: float
) -> AsyncIterator[StrandedSweeper]:
    """Run a stage's sweeper for the life of the block (a worker's __main__ hook)."""
    sweeper = StrandedSweeper(js, store, stage, prefix, poll_s)
    stop = asyncio.Event()
    task = asyncio.create_task(sweeper.run(stop), name=f"stranded-{stage.value}")
    try:
        yield sweeper
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5.0)
        if not task.done():
            task.cancel()
