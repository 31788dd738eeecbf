"""Publishing download tasks to JetStream, and the cached backlog read behind
backpressure.

`Nats-Msg-Id` is the item id, so a task published twice inside the stream's
duplicate window is stored once; the result store's SET NX covers the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import nats.js.errors
from nats.js.client import JetStreamContext
from tagpipe_common.messages import SCHEMA_VERSION, DownloadTask
from tagpipe_common.streams import stage_backlog
from tagpipe_common.subjects import HDR_MSG_ID, HDR_SCHEMA, Stage, stage_names
from tagpipe_common.telemetry import inject_headers

from tagpipe_gateway.problems import ProblemCode, ProblemError

# JetStream API error codes for a stream at its message/byte limits.
_STREAM_FULL = {10077, 10078}


class BacklogCache:
    """`stage_backlog(download)`, re-read at most every `ttl_s` (it costs two API calls)."""

    def __init__(self, js: JetStreamContext, prefix: str, ttl_s: float) -> None:
        self.js = js
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._value = 0
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self) -> int:
        if time.monotonic() - self._read_at < self.ttl_s:
            return self._value
        async with self._lock:  # one read serves every request waiting on it
            if time.monotonic() - self._read_at >= self.ttl_s:
                self._value = await stage_backlog(self.js, Stage.DOWNLOAD, self.prefix)
                self._read_at = time.monotonic()
        return self._value

    def note_published(self, n: int) -> None:
        """Count our own publishes until the next read, so bursts cannot overshoot a limit."""
        self._value += n


class Publisher:
    def __init__(self, js: JetStreamContext, prefix: str, timeout_s: float = 5.0) -> None:
        self.js = js
        self.names = stage_names(Stage.DOWNLOAD, prefix)
        self.timeout_s = timeout_s

    async def publish(self, task: DownloadTask) -> None:
        headers = inject_headers({HDR_MSG_ID: task.item_id, HDR_SCHEMA: str(SCHEMA_VERSION)})
        try:
            await self.js.publish(
                self.names.subject(task.lane),
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
