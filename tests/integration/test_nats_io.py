"""Closing a NATS connection at shutdown never raises, whatever the server did."""

from __future__ import annotations

import logging

import pytest
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.nats_io import close_nats, connect_nats

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
