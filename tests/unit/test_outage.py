"""Outage bookkeeping: what counts as transient, backoff bounds, one line per episode."""

from __future__ import annotations

import asyncio
import logging

import nats.errors
import nats.js.errors
import pytest
import redis.exceptions
from redis.asyncio.sentinel import MasterNotFoundError
from tagpipe_common.outage import Outage, describe, is_transient
from tagpipe_common.redis_io import NotReplicated

log = logging.getLogger("test.outage")


@pytest.mark.parametrize(
    "exc",
    [
        nats.js.errors.ServiceUnavailableError(),
        nats.errors.NoRespondersError(),
        nats.errors.TimeoutError(),
        nats.errors.ConnectionClosedError(),
        nats.errors.ConnectionReconnectingError(),
        ConnectionResetError("Connection lost"),
        TimeoutError(),
        redis.exceptions.ConnectionError("refused"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        MasterNotFoundError("No master found for 'tagpipe'"),
        NotReplicated("WAIT: 0 of 1 replicas acknowledged within 1000 ms"),
    ],
)
def test_broker_hiccups_are_transient(exc: Exception) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        nats.js.errors.NotFoundError(),  # a missing stream is configuration, not weather
        nats.js.errors.BadRequestError(),
        nats.errors.AuthorizationError(),
        ValueError("bug"),
    ],
)
def test_configuration_errors_and_bugs_are_not(exc: Exception) -> None:
    assert not is_transient(exc)


def test_backoff_has_full_jitter_under_a_doubling_cap() -> None:
    outage = Outage("jetstream", log, base_s=0.1, max_s=2.0)
    for cap in [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]:
        assert 0 <= outage.failed(TimeoutError()) <= cap
    outage.ok()
    assert outage.failed(TimeoutError()) <= 0.1  # a new episode starts from the base
    samples = {Outage("x", log, 1.0, 1.0).failed(TimeoutError()) for _ in range(50)}
    assert len(samples) > 40  # jittered, not a fixed sleep the whole fleet shares in step


def test_one_warning_per_episode_and_one_line_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.outage")
    outage = Outage("jetstream", log)
    assert outage.healthy
    for _ in range(25):
        outage.failed(nats.js.errors.ServiceUnavailableError())
    assert not outage.healthy and outage.attempts == 25
    outage.ok()
    outage.ok()  # a second success in a row says nothing more
    outage.failed(nats.errors.NoRespondersError())
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [lvl for lvl, _ in lines] == ["WARNING", "INFO", "WARNING"]
    assert "ServiceUnavailableError" in lines[0][1]
    assert "25 retries" in lines[1][1]
    assert outage.episodes == 2


def test_describe_names_the_type_of_an_empty_error() -> None:
    assert (
        describe(nats.errors.NoRespondersError())
        == "NoRespondersError: nats: no responders available for request"
    )
    assert describe(TimeoutError()) == "TimeoutError"


async def test_pause_returns_early_on_stop() -> None:
    stop = asyncio.Event()
    stop.set()
    outage = Outage("jetstream", log, base_s=60.0, max_s=60.0)
    async with asyncio.timeout(5):  # a hang, not a speed check: 60 s of backoff skipped
        await outage.pause(TimeoutError(), stop)
    assert outage.attempts == 1
