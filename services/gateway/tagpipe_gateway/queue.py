"""Publishing download tasks to JetStream, and the cached backlog read behind
backpressure.

`Nats-Msg-Id` is the item id, so a task published twice inside the stream's
duplicate window is stored once; the result store's SET NX covers the rest.
With several partitions an item's stream is a hash of its id
(subjects.partition_of), so a republish reaches the same stream and its dedupe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import nats.js.errors
from nats.js.client import JetStreamContext
from opentelemetry import context as otel_context
from opentelemetry import trace
from tagpipe_common import telemetry
from tagpipe_common.messages import SCHEMA_VERSION, DownloadTask
from tagpipe_common.streams import lane_backlogs, stage_counters
from tagpipe_common.subjects import (
    HDR_MSG_ID,
    HDR_SCHEMA,
    Lane,
    Stage,
    partition_names,
    partition_of,
)

from tagpipe_gateway.admission import DrainRate, Reading
from tagpipe_gateway.problems import ProblemCode, ProblemError

# JetStream API error codes for a stream at its message/byte limits.
_STREAM_FULL = {10077, 10078}
_tracer = telemetry.tracer("tagpipe_gateway")


class BacklogCache:
    """The whole pipeline's backlog (download + inference stages), re-read at most
    every `ttl_s` (the consumers and the inference stream, read concurrently).

    Both stages count: a stalled inference tier drains the download queue into
    the inference queue, so the download backlog alone would never push back.
    Each read also feeds the drain rate that real-time admission estimates from,
    and keeps the real-time lane's share (`realtime`).
    """

    def __init__(
        self,
        js: JetStreamContext,
        prefix: str,
        ttl_s: float,
        rate_window_s: float = 5.0,
        partitions: int = 1,
    ) -> None:
        self.js = js
        self.prefix = prefix
        self.partitions = partitions  # every partition's consumers are summed
        self.ttl_s = ttl_s
        self.drain = DrainRate(rate_window_s)
        # Real-time items of this gateway's requests still waiting for a result, known
        # at once (the notifier's count; set by the runtime). A read is up to `ttl_s` old.
        self.local: Callable[[], int] = lambda: 0
        self._value = 0
        self._noted = 0  # our publishes since the current read began (it may miss them)
        self._others = 0  # real-time items at the last read that were not ours
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self) -> int:
        if time.monotonic() - self._read_at < self.ttl_s:
            return self._value
        async with self._lock:  # one read serves every request waiting on it
            if time.monotonic() - self._read_at >= self.ttl_s:
                await self._read()
        return self._value

    async def current(self) -> None:
        """Read if stale, unless a read is already under way: then decide on what is
        known (admission's own count is always current), so that requests never queue
        behind a slow read (at 3x capacity on a busy box, with every request awaiting
        the read, refusals took up to 2.8 s in one run)."""
        if not self._lock.locked():
            await self.get()

    async def _read(self) -> None:
        self._noted = 0
        lanes, infer = await asyncio.gather(
            lane_backlogs(self.js, self.prefix, self.partitions),
            stage_counters(self.js, Stage.INFER, self.prefix, self.partitions),
        )
        self._read_at = time.monotonic()
        backlog = sum(lanes.values())
        # A batch published while the read was under way may be missing from it: keep
        # counting it (perhaps twice, which only pauses a little longer), or a slow read
        # on a busy box hands back room that batch took and a limit overshoots.
        self._value = backlog + self._noted
        self._others = max(0, lanes[Lane.REALTIME] - self.local())
        self.drain.observe(Reading(self._read_at, infer.removed, backlog))

    @property
    def realtime(self) -> int:
        """The real-time items ahead of a new one: ours, counted as they are admitted and
        answered (a burst between two reads is seen at once), plus the others' (other
        replicas, and our requests that gave up while their items still queue) as of
        the last read."""
        return self.local() + self._others

    def note_published(self, n: int) -> None:
        """Count our own publishes until the next read, so bursts cannot overshoot a limit."""
        self._value += n
        self._noted += n


class Publisher:
    def __init__(
        self, js: JetStreamContext, prefix: str, timeout_s: float = 5.0, partitions: int = 1
    ) -> None:
        self.js = js
        self.partitions = partition_names(Stage.DOWNLOAD, prefix, partitions)
        self.timeout_s = timeout_s

    async def publish(self, task: DownloadTask) -> None:
        # Real-time items live in their request's trace. A bulk item starts a
        # trace of its own (a job may hold millions), linked to the job's span.
        parent, links = None, []
        if task.job_id is not None:
            parent = otel_context.Context()
            job_span = trace.get_current_span().get_span_context()
            links = [trace.Link(job_span)] if job_span.is_valid else []
        attrs = {"tagpipe.item_id": task.item_id, "tagpipe.lane": task.lane.value}
        with _tracer.start_as_current_span("publish", parent, attributes=attrs, links=links):
            await self._publish(task)

    async def _publish(self, task: DownloadTask) -> None:
        headers = telemetry.inject_headers(
            {HDR_MSG_ID: task.item_id, HDR_SCHEMA: str(SCHEMA_VERSION)}
        )
        try:
            names = self.partitions[partition_of(task.item_id, len(self.partitions))]
            await self.js.publish(
                names.subject(task.lane),
                task.to_json(),
                timeout=self.timeout_s,
                headers=headers,
            )
        except nats.js.errors.APIError as exc:
            # The stream refuses new work when full (DiscardPolicy.NEW): that is
            # backpressure, not a fault.
            if exc.err_code in _STREAM_FULL:
                raise ProblemError(
                    429,
                    ProblemCode.BACKLOG_FULL,
                    "Work queue full",
                    f"the download stream refused the item: {exc.description}",
                    headers={"Retry-After": "5"},
                ) from None
            raise

    async def publish_many(self, tasks: Sequence[DownloadTask]) -> None:
        """Publish concurrently; the caller bounds how many are in flight."""
        await asyncio.gather(*(self.publish(t) for t in tasks))
