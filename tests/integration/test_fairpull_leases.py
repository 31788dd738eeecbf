"""What a FairPull holds between calls, on a real nats-server: the messages its
fetches brought beyond what a call handed out stay this worker's (their lease is
renewed) until it asks again, and stopping gives back even what a fetch still in
flight had received.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from tagpipe_common.fairpull import bind_lane
from tagpipe_common.streams import StreamPolicy, ensure_streams
from tagpipe_common.subjects import HDR_MSG_ID, Lane, Stage, StageNames, partition_of

pytestmark = pytest.mark.integration

PARTS = 3
ACK_WAIT_S = 1.5  # short, so that a lease not renewed runs out within the test


async def short_lease(js: JetStreamContext) -> list[StageNames]:
    policy = StreamPolicy(prefix="lease", ack_wait_s=ACK_WAIT_S, max_deliver=5, partitions=PARTS)
    await ensure_streams(js, policy)
    return policy.names(Stage.INFER)


async def one_per_partition(js: JetStreamContext, names: list[StageNames]) -> list[str]:
    """Publish one bulk message to each partition; returns their ids."""
    ids: dict[int, str] = {}
    while len(ids) < PARTS:
        item_id = uuid.uuid4().hex
        ids.setdefault(partition_of(item_id, PARTS), item_id)
    for p, item_id in ids.items():
        await js.publish(
            names[p].subject(Lane.BULK), item_id.encode(), headers={HDR_MSG_ID: item_id}
        )
    return list(ids.values())


async def test_what_is_held_between_calls_is_not_delivered_again(js: JetStreamContext) -> None:
    names = await short_lease(js)
    ids = await one_per_partition(js, names)
    pull = await bind_lane(js, names, Lane.BULK)
    other = await bind_lane(js, names, Lane.BULK)  # another replica of the stage
    try:
        taken = await pull.fetch(1, 5.0)
        await taken[0].ack()  # the one handed out is the worker's to finish
        if pull._inflight:  # every partition's fetch lands; the rest is held
            await asyncio.wait(list(pull._inflight.values()), timeout=10.0)
        # The worker does not ask this lane again for three ack waits (real-time
        # work, or every slot busy): what it holds must not go to anyone else.
        await asyncio.sleep(3 * ACK_WAIT_S)
        assert await other.fetch(PARTS, 1.0) == []
        while len(taken) < PARTS:
            taken += await pull.fetch(PARTS, 2.0)
        assert sorted(m.data.decode() for m in taken) == sorted(ids)
        for m in taken[1:]:
            await m.ack()
    finally:
        await other.close()
        assert await pull.close() == 0


async def test_stopping_gives_back_what_its_fetches_received(js: JetStreamContext) -> None:
    names = await short_lease(js)
    pull = await bind_lane(js, names, Lane.BULK)
    other = await bind_lane(js, names, Lane.BULK)
    try:
        # One message is asked for, every partition is polled for one: the call
        # returns with the first, the other fetches land (or are landing) after.
        call = asyncio.create_task(pull.fetch(1, 1.5))
        await asyncio.sleep(0.3)
        ids = await one_per_partition(js, names)
        [handed] = await call
        await handed.ack()
        # The worker stops: what the other partitions' fetches got is given back
        # (NAKed), not dropped to wait out its ack wait.
        assert await pull.close() == PARTS - 1
        got: list[Msg] = []
        for _ in range(10):
            got += await other.fetch(PARTS, 1.0)
            if len(got) == PARTS - 1:
                break
        assert sorted(m.data.decode() for m in got) == sorted(set(ids) - {handed.data.decode()})
        assert all(m.metadata.num_delivered == 2 for m in got)
        for m in got:
            await m.ack()
    finally:
        await other.close()


async def test_stopping_ends_a_keeper_that_swallowed_its_cancel(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats.py swallows CancelledError in places (its flush on publish), so a
    cancel sent while the keeper renews can be lost; close must end anyway. It
    once hung CI for 300 s: the keeper went on renewing, close waited on it."""
    names = await short_lease(js)
    await one_per_partition(js, names)
    renewing = asyncio.Event()
    in_progress = Msg.in_progress

    async def swallowing_in_progress(msg: Msg) -> None:
        renewing.set()
        with contextlib.suppress(asyncio.CancelledError):  # as nats.py's flush does
            await asyncio.sleep(0.5)
        await in_progress(msg)

    monkeypatch.setattr(Msg, "in_progress", swallowing_in_progress)
    pull = await bind_lane(js, names, Lane.BULK)
    taken = await pull.fetch(1, 5.0)
    await taken[0].ack()
    if pull._inflight:
        await asyncio.wait(list(pull._inflight.values()), timeout=10.0)
    await asyncio.wait_for(renewing.wait(), timeout=10 * ACK_WAIT_S)
    # a hang guard, not a speed bound: the old close never returned
    assert await asyncio.wait_for(pull.close(), timeout=60.0) == PARTS - 1
