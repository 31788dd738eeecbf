"""Closing a NATS connection at shutdown never raises, whatever the server did."""

from __future__ import annotations

import asyncio
import logging

import pytest
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.nats_io import cancel_until_done, close_nats, connect_nats

from tests.tools import eventually

pytestmark = pytest.mark.integration


async def test_close_after_the_server_died_does_not_raise(
    nats_proc: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await connect_nats([nats_proc.url], "close-test")
    await nc.publish("x.y", b"pending")
    nats_proc.stop()  # the peer goes away with the client still "connected"
    caplog.set_level(logging.WARNING)
    await close_nats(nc, timeout_s=2.0)
    assert nc.is_closed


async def test_close_twice_is_harmless(nats_proc: ServerProcess) -> None:
    nc = await connect_nats([nats_proc.url], "close-test")
    await close_nats(nc)
    await close_nats(nc)
    assert nc.is_closed


async def test_close_while_reconnecting_ends_the_reconnect_loop(
    nats_proc: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await connect_nats([nats_proc.url], "close-test")
    await nc.publish("x.y", b"pending")
    nats_proc.stop()
    await eventually(lambda: nc.is_reconnecting)  # the read loop notices the dead peer
    caplog.set_level(logging.WARNING)
    await close_nats(nc, timeout_s=2.0)
    assert nc.is_closed
    reconnect = nc._reconnection_task
    assert reconnect is not None and reconnect.done()
    assert "still running" not in caplog.text


async def test_cancel_until_done_ends_a_task_that_lost_a_cancel() -> None:
    """What Python 3.11's wait_for does to nats.py's reconnect loop (bpo-42130):
    a cancel arriving as a connect attempt fails becomes that failure, and the
    loop goes on retrying."""
    attempts = 0

    async def reconnect_loop() -> None:
        nonlocal attempts
        lost_one = False
        while True:
            attempts += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost_one:
                    raise
                lost_one = True  # swallowed, as wait_for would

    task = asyncio.create_task(reconnect_loop())
    await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # one cancel was not enough
    await cancel_until_done(task, timeout_s=2.0)
    assert task.cancelled()
