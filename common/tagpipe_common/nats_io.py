"""Connecting to NATS the same way everywhere: reconnect forever, log why.

`TAGPIPE_NATS_URL` names one server or several, comma-separated (a JetStream
cluster): the client connects to any of them, learns the others from the
server, and on a disconnect reconnects to whichever answers, so a killed server
or a stream leader change is a pause, not an error.

A server that hangs without a TCP reset (a frozen VM, a partition) sends no
disconnect: `NatsLiveness` PINGs it often enough that such a server is called
stale, and left for another, within seconds rather than nats.py's minutes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from tagpipe_common.outage import describe, is_transient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NatsLiveness:
    """How a client notices a server that stopped answering (no reset, no FIN).

    nats.py PINGs every `ping_interval_s` and drops the connection once more than
    `max_outstanding_pings` PINGs are unanswered: a frozen server is found within
    (max_outstanding_pings + 1) x ping_interval_s (9 s with these defaults; nats.py's
    own 120 s x 2 would take 4-6 minutes). The settings
    (`CommonSettings.nats_liveness`) choose these; the defaults here are theirs.
    """

    ping_interval_s: float = 3.0
    max_outstanding_pings: int = 2
    connect_timeout_s: float = 2.0
    """A frozen server accepts TCP (its kernel does) and never sends INFO: each
    reconnect attempt to it costs this much before the next server is tried."""

    @property
    def detect_s(self) -> float:
        """The longest a frozen server goes unnoticed."""
        return (self.max_outstanding_pings + 1) * self.ping_interval_s

    def options(self) -> dict[str, Any]:
        """The keep-alive keywords of `nats.connect` (the connect timeout is the caller's)."""
        return {
            "ping_interval": self.ping_interval_s,
            "max_outstanding_pings": self.max_outstanding_pings,
        }


class _AbortStale(Client):
    """nats.py closes a stale connection gracefully, and asyncio's close first flushes
    what is buffered for the server. A frozen server never reads it: with a publisher
    (the downloader's frames) the buffer stays full, the reconnect waits on the close,
    and the client never leaves the server (seen: stale after 8 s, still there 12 s
    later, gone only when the server thawed). Aborting drops the buffer (its publishes
    are unacked and retried) and lets the reconnect start at once."""

    async def _process_op_err(self, e: Exception) -> None:
        if isinstance(e, nats.errors.StaleConnectionError):
            writer = getattr(getattr(self, "_transport", None), "_io_writer", None)
            if writer is not None:
                writer.transport.abort()
        await super()._process_op_err(e)


async def connect_nats(
    servers: list[str], name: str, liveness: NatsLiveness | None = None
) -> Client:
    """A connection that reconnects forever; `liveness` from the component's settings
    (`settings.nats_liveness()`), the same defaults for tools and tests."""
    live = liveness or NatsLiveness()

    async def on_error(exc: Exception) -> None:
        # Every failed reconnect attempt lands here: the disconnect already said
        # WARNING once for the episode, so attempts are DEBUG.
        level = logging.DEBUG if is_transient(exc) else logging.WARNING
        log.log(level, "nats error: %s", describe(exc))

    async def on_disconnect() -> None:
        log.warning("nats disconnected; reconnecting")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    # nats.py types these seconds as int; it only ever sleeps or waits on them.
    seconds: dict[str, Any] = {
        "reconnect_time_wait": 0.5,
        "connect_timeout": live.connect_timeout_s,
    }
    nc = _AbortStale()
    await nc.connect(
        servers=servers,
        # Reconnect to the other servers in turn: one dead node must not hold a worker.
        name=name,
        max_reconnect_attempts=-1,  # a NATS restart must never kill a worker
        **seconds,
        **live.options(),
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    return nc


async def close_nats(nc: Client, timeout_s: float = 5.0) -> None:
    """Flush what is pending (the last acks) and close; never raises, always ends.

    Called from a `finally` at shutdown: an error here would replace the one that
    is being handled, and a connection to a dead server fails to flush or close.
    """
    # A flush while reconnecting only waits out its timeout for a PONG.
    steps = (nc.flush, nc.close) if nc.is_connected else (nc.close,)
    for step in steps:
        if nc.is_closed:
            break
        try:
            await asyncio.wait_for(step(), timeout_s)
        except Exception as exc:  # a dead peer: reset, timeout, closed
            log.warning("nats %s at shutdown failed: %s", step.__name__, describe(exc))
    # nats.py cancels its reconnect loop once. On Python 3.11, asyncio.wait_for
    # loses a cancel that lands just as a connect attempt fails (bpo-42130), and
    # that loop then retries every reconnect_time_wait forever, so the event
    # loop's shutdown (asyncio.run, a test's runner) never ends.
    await cancel_until_done(getattr(nc, "_reconnection_task", None), timeout_s)


async def cancel_until_done(task: asyncio.Task[Any] | None, timeout_s: float) -> None:
    """Cancel `task` again and again until it ends or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while task is not None and not task.done() and time.monotonic() < deadline:
        task.cancel()
        await asyncio.wait([task], timeout=0.05)
    if task is not None and not task.done():
        log.warning("nats reconnect task still running after %.1f s at shutdown", timeout_s)


SETTING = "TAGPIPE_NATS_URL"


async def _reachable(servers: list[str], timeout_s: float) -> str | None:
    """None once any server completes a NATS handshake; else the last error."""
    last = "no answer"

    async def on_error(exc: Exception) -> None:
        nonlocal last
        last = describe(exc)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            # Each server twice, then NoServersError: bounded, unlike connect_nats.
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=servers,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.2,
                    connect_timeout=2,
                    error_cb=on_error,
                ),
                max(0.1, deadline - time.monotonic()),
            )
        except Exception as exc:  # refused, timed out, no servers left: the callback said why
            if last == "no answer" and not isinstance(exc, nats.errors.NoServersError):
                last = describe(exc)
            await asyncio.sleep(0.5)
            continue
        await nc.close()
        return None
    return last


def require_nats(servers: list[str], label: str, timeout_s: float = 15.0) -> None:
    """Start-up check: some server of the list answers within `timeout_s`, or the
    process stops with exit status 2 and one line naming the setting.

    A list where no server answers is a deployment error to show at once (a
    typo'd host, a wrong port); one server of a cluster down is not, and a NATS
    restarting while the process starts is ridden out within `timeout_s`.
    """
    problem = asyncio.run(_reachable(servers, timeout_s))
    if problem is not None:
        shown = ",".join(redact(u) for u in servers)
        print(
            f"{label}: no server of {SETTING}={shown} reachable within {timeout_s:g}s ({problem})",
            file=sys.stderr,
        )
        raise SystemExit(2)


def redact(url: str) -> str:
    """A NATS URL fit for a log line: user and password dropped."""
    u = urlsplit(url)
    host = u.hostname or ""
    netloc = f"{host}:{u.port}" if u.port else host
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


async def ensure_stream(js: JetStreamContext, cfg: StreamConfig) -> None:
    """Create a stream, or update it to `cfg` where it exists (the operator and
    `tagpipe up` run this on every start)."""
    assert cfg.name is not None
    try:
        await js.stream_info(cfg.name)
    except NotFoundError:
        await js.add_stream(cfg)
    else:
        await js.update_stream(cfg)
