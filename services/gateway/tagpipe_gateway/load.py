"""The gateway reports its own load (requests in flight) for the operator to scale on.

Every PERIOD_S it puts a LoadReport under its own key in the pipeline's key-value bucket
(tagpipe_common.gatewayload); on a clean exit it deletes the key, so the operator stops
counting it at once instead of after the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

from nats.js.api import KeyValueConfig
from tagpipe_common.gatewayload import PERIOD_S, TTL_S, LoadReport, bucket_name
from tagpipe_common.nats_io import cancel_until_done
from tagpipe_common.outage import describe

from tagpipe_gateway.metrics import INFLIGHT

log = logging.getLogger(__name__)


def in_flight() -> int:
    """The requests this process is serving, from its own Prometheus gauge."""
    return int(INFLIGHT._value.get())


class LoadReporter:
    def __init__(self, js: Any, prefix: str, replicas: int = 1) -> None:
        self.js, self.bucket = js, bucket_name(prefix)
        self.replicas = replicas  # as the streams: a report survives what they survive
        # Host (the pod's name) and pid: two gateways on one host stay apart.
        self.key = f"{socket.gethostname()}-{os.getpid()}".replace(".", "-")
        self._kv: Any = None
        self._task: asyncio.Task[None] | None = None

    async def _bucket(self) -> Any:
        if self._kv is None:
            # Idempotent: every gateway asks for the same bucket; the first creates it.
            config = KeyValueConfig(
                bucket=self.bucket, history=1, ttl=TTL_S, replicas=self.replicas
            )
            self._kv = await self.js.create_key_value(config)
        return self._kv

    async def report(self) -> None:
        kv = await self._bucket()
        await kv.put(self.key, LoadReport(in_flight(), time.time()).encode())

    async def _run(self) -> None:
        while True:
            try:
                await self.report()
            except Exception as exc:  # a missed beat only ages the report; never fatal
                log.warning("gateway load report failed: %s", describe(exc))
                self._kv = None
            await asyncio.sleep(PERIOD_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-load")

    async def close(self) -> None:
        # Again until it ends: a cancel landing in a put's wait_for can be lost (3.11).
        await cancel_until_done(self._task, 5.0)
        if self._kv is None:
            return  # never reported (or the last report failed): nothing to delete
        with contextlib.suppress(Exception):  # NATS gone: the TTL drops the key instead
            await self._kv.delete(self.key)
