"""A peer that hangs without a TCP reset (SIGSTOP: its kernel still accepts bytes) is
noticed by every client we build, instead of being waited on for minutes.

The bounds here are short so the tests are quick; each test asserts that the
client gave up on the frozen peer and came back after SIGCONT, never how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import redis.exceptions
from nats.aio.client import Client
from tagpipe_cli.redis_ha import RedisSentinelSet
from tagpipe_cli.servers import ServerProcess, nats_server
from tagpipe_common.keys import RedisKeys
from tagpipe_common.nats_io import NatsLiveness, close_nats, connect_nats
from tagpipe_common.redis_io import Durability, RedisTimeouts, connect_redis
from tagpipe_common.results import ResultStore
from tagpipe_gateway.waiters import Notifier, Waiter

from tests.tools import eventually, frozen

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

QUICK = RedisTimeouts(socket_timeout_s=1.5, connect_timeout_s=1.0, health_check_interval_s=1.0)


async def test_a_command_to_a_frozen_redis_times_out_and_the_next_one_works(
    redis_proc: ServerProcess,
) -> None:
    client = connect_redis(redis_proc.url, QUICK)
    try:
        await client.set("k", "v")
        with frozen(redis_proc.proc), pytest.raises(redis.exceptions.TimeoutError):
            await client.get("k")  # without a socket timeout: waits as long as the kernel
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


async def test_the_notifier_leaves_a_frozen_subscription_and_resubscribes(
    redis_proc: ServerProcess,
) -> None:
    client = connect_redis(redis_proc.url, QUICK)
    keys = RedisKeys("frz")
    notifier = Notifier(client, ResultStore(client, keys), keys.notify_channel, dead_after_s=1.5)
    await notifier.start()
    try:
        with frozen(redis_proc.proc):
            # A quiet channel and a frozen server look alike to listen(): only the
            # unanswered PINGs tell them apart.
            await eventually(lambda: not notifier.outage.healthy, within=60)
        waiter = notifier.register("req", ["item"])
        await eventually(lambda: notifier.outage.healthy, within=60)  # subscribed again
        publisher = connect_redis(redis_proc.url, QUICK)
        try:
            # PUBLISH counts the server's subscribers, which may still include the frozen
            # connection it has not yet dropped, and the notifier reads the message a
            # moment later: publish until the waiter has heard one.
            await eventually(
                lambda: _notify_until_heard(publisher, keys.notify_channel, waiter), within=30
            )
        finally:
            await publisher.aclose()
        assert waiter.event.is_set()
    finally:
        await notifier.stop()
        await client.aclose()


async def _notify_until_heard(publisher: redis.asyncio.Redis, channel: str, waiter: Waiter) -> bool:
    if not waiter.event.is_set():
        await publisher.publish(channel, '{"request_id": "req", "item_id": "item"}')
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.event.wait(), 0.5)
    return waiter.event.is_set()


async def test_a_frozen_nats_server_is_called_stale_and_rejoined_after(
    nats_proc: ServerProcess,
) -> None:
    live = NatsLiveness(ping_interval_s=0.5, max_outstanding_pings=2, connect_timeout_s=1.0)
    nc = await connect_nats([nats_proc.url], "frozen-test", live)
    try:
        with frozen(nats_proc.proc):
            # nats.py's own 120 s x 2 PINGs would leave it "connected" for minutes.
            await eventually(lambda: not nc.is_connected, within=60)
        await eventually(lambda: nc.is_connected, within=60)
        await asyncio.wait_for(nc.flush(), 10)
    finally:
        await close_nats(nc)


async def test_a_publisher_on_a_frozen_server_moves_to_another_while_it_stays_frozen(
    nats_proc: ServerProcess, tmp_path: Path
) -> None:
    """A publisher fills the socket towards the frozen server; a graceful close would
    wait to flush it for as long as the server stays frozen (nats_io._AbortStale)."""
    other = nats_server(tmp_path / "other").start()
    live = NatsLiveness(ping_interval_s=0.5, max_outstanding_pings=2, connect_timeout_s=1.0)
    try:
        nc = await connect_nats([nats_proc.url, other.url], "frozen-publisher", live)
        assert nc.connected_url is not None
        first, second = (
            (nats_proc, other)
            if nc.connected_url.port == nats_proc.port
            else (
                other,
                nats_proc,
            )
        )
        stop = asyncio.Event()

        async def flood() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    await nc.publish("frozen.flood", b"x" * 32_768)
                await asyncio.sleep(0.005)

        publisher = asyncio.create_task(flood())
        try:
            with frozen(first.proc):
                await eventually(lambda: _on(nc, second), within=60)
                await asyncio.wait_for(nc.flush(), 10)  # answered, by the other server
        finally:
            stop.set()
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            await close_nats(nc)
    finally:
        other.stop()


def _on(nc: Client, srv: ServerProcess) -> bool:
    url = nc.connected_url
    return nc.is_connected and url is not None and url.port == srv.port


async def test_a_write_in_flight_when_the_primary_froze_lands_on_the_promoted_replica(
    tmp_path: Path,
) -> None:
    """redis-py's retry of that write reconnects; without redis_io._Rediscovering it
    dials the frozen primary again each time and fails after its 4th socket timeout."""
    ha = await asyncio.to_thread(RedisSentinelSet(tmp_path / "redis").start)
    client = connect_redis(ha.url)  # the default timeouts: 5 s, longer than a failover here
    try:
        await client.set("n", 0)
        old = ha.primary()
        with frozen(old.proc):
            async with client.pipeline(transaction=False) as pipe:
                pipe.incr("n")
                Durability(replicas=1).queue(pipe)  # as the result store writes
                replies = await pipe.execute()  # sent to the frozen primary, retried
            new = await asyncio.to_thread(ha.wait_failover, old)
            assert Durability(replicas=1).check(replies) == [1]
            with redis.Redis(port=new.port, socket_timeout=2) as r:
                assert r.get("n") == b"1"
    finally:
        await client.aclose()
        await asyncio.to_thread(ha.stop)
