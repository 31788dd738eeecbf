"""Connecting to NATS the same way everywhere: reconnect forever, log why."""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client

from tagpipe_common.outage import describe, is_transient

log = logging.getLogger(__name__)


async def connect_nats(servers: list[str], name: str) -> Client:
    async def on_error(exc: Exception) -> None:
        # Every failed reconnect attempt lands here: the disconnect already said
        # WARNING once for the episode, so attempts are DEBUG.
        level = logging.DEBUG if is_transient(exc) else logging.WARNING
        log.log(level, "nats error: %s", describe(exc))

    async def on_disconnect() -> None:
        log.warning("nats disconnected; reconnecting")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    return await nats.connect(
        servers=servers,
        name=name,
        max_reconnect_attempts=-1,  # a NATS restart must never kill a worker
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )


async def close_nats(nc: Client, timeout_s: float = 5.0) -> None:
    """Flush what is pending (the last acks) and close; never raises.

    Called from a `finally` at shutdown: an error here would replace the one that
    is being handled, and a connection to a dead server fails to flush or close.
    """
    for step in (nc.flush, nc.close):
        if nc.is_closed:
            return
        try:
            await asyncio.wait_for(step(), timeout_s)
        except Exception as exc:  # a dead peer: reset, timeout, closed
            log.warning("nats %s at shutdown failed: %s", step.__name__, describe(exc))
