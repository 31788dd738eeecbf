"""Riding out a broker outage: which errors are transient, and one episode's bookkeeping.

A NATS restart or a JetStream leader change is routine (a rolling upgrade does
it on purpose), so a long-running loop never exits over one. For a moment after
a restart JetStream answers "service unavailable" before its streams are back;
while the client reconnects, requests time out or find no responders. Each of
these is retried with backoff and full jitter (so a fleet of workers does not
hammer the server in step), the process stays up and reports not-ready, and the
log carries one WARNING line when the episode starts and one INFO line when it
ends, not a line (or a traceback) per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import nats.errors
import nats.js.errors
import redis.exceptions

# Everything that means "the broker is away for now", never "you asked wrongly".
TRANSIENT_NATS_ERRORS: tuple[type[Exception], ...] = (
    nats.js.errors.ServiceUnavailableError,  # JetStream up, its streams not yet recovered
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,  # publishes pile up while reconnecting
    nats.errors.NoServersError,
    TimeoutError,
    ConnectionError,  # reset or refused sockets (OSError subclasses)
)
TRANSIENT_REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,  # a restarted Redis still reading its dump
    # A failover: a demoted primary refuses writes until the client finds the new one
    # (the Sentinel client turns this into a ConnectionError itself; a plain URL behind
    # a moving address does not). MasterNotFoundError and redis_io.NotReplicated are
    # ConnectionErrors already.
    redis.exceptions.ReadOnlyError,
)
TRANSIENT_ERRORS = TRANSIENT_NATS_ERRORS + TRANSIENT_REDIS_ERRORS


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


def describe(exc: BaseException) -> str:
    """nats-py's errors often print as '' or 'None' fields: name the type too."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Outage:
    """The outage episodes of one dependency, as seen by one loop.

    `failed(exc)` records an attempt that met a transient error and returns how
    long to back off (full jitter over a doubling cap); the first failure of an
    episode logs one WARNING. `ok()` ends the episode with one INFO line.
    `healthy` is what /readyz reports.
    """

    def __init__(
        self, what: str, logger: logging.Logger, base_s: float = 0.1, max_s: float = 5.0
    ) -> None:
        self.what = what
        self.log = logger
        self.base_s = base_s
        self.max_s = max_s
        self.attempts = 0  # failures in the current episode
        self.episodes = 0  # outages seen since start (tests and metrics read it)
        self._since = 0.0
        self.last_error = ""

    @property
    def healthy(self) -> bool:
        return self.attempts == 0

    def failed(self, exc: BaseException) -> float:
        self.last_error = describe(exc)
        if self.attempts == 0:
            self.episodes += 1
            self._since = time.monotonic()
            self.log.warning(
                "%s unavailable, retrying with backoff: %s", self.what, self.last_error
            )
        cap = min(self.max_s, self.base_s * 2 ** min(self.attempts, 30))
        self.attempts += 1
        return random.uniform(0, cap)

    def ok(self) -> None:
        if self.attempts:
            took = time.monotonic() - self._since
            self.log.info(
                "%s available again after %.1fs and %d retries", self.what, took, self.attempts
            )
            self.attempts = 0

    async def pause(self, exc: BaseException, stop: asyncio.Event | None = None) -> None:
        """Record a failure and back off; returns early when `stop` is set."""
        delay = self.failed(exc)
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
