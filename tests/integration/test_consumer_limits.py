"""Consumer limits that follow the deployment, on a real nats-server: max_ack_pending
updates in place, and a consumer whose max_waiting must change is replaced with a
backlog present and messages held by a worker, without losing or re-delivering one."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from nats.js.client import JetStreamContext
from tagpipe_common.flowlimits import consumer_limits
from tagpipe_common.streams import StreamPolicy, ensure_streams
from tagpipe_common.subjects import Lane, Stage, stage_names

DL = stage_names(Stage.DOWNLOAD)
N = 300


async def _worker(js: JetStreamContext, seen: dict[int, int], held: asyncio.Event) -> None:
    """Fetch 10 at a time and hold them a while before acking, as a slow download would."""
    sub = await js.pull_subscribe_bind(DL.consumer(Lane.BULK), DL.stream)
    while len(seen) < N:
        try:
            msgs = await sub.fetch(10, timeout=0.5)
        except Exception:  # timeouts, and the consumer briefly gone while it is replaced
            await asyncio.sleep(0.05)
            continue
        held.set()
        await asyncio.sleep(0.3)
        for m in msgs:
            seq = m.metadata.sequence.stream
            seen[seq] = seen.get(seq, 0) + 1
            assert m.metadata.num_delivered == 1, f"message {seq} delivered again"
            await m.ack_sync()


async def test_limits_grow_by_replacing_the_consumer_without_redelivery(
    js: JetStreamContext, policy: StreamPolicy
) -> None:
    for i in range(N):
        await js.publish(DL.subject(Lane.BULK), f"task-{i}".encode())
    before = await js.consumer_info(DL.stream, DL.consumer(Lane.BULK))
    assert before.config.max_waiting == 512 and before.config.max_ack_pending == 1000

    seen: dict[int, int] = {}
    held = asyncio.Event()
    worker = asyncio.create_task(_worker(js, seen, held))
    await held.wait()  # the worker holds messages unacked while the consumer is replaced
    limits = consumer_limits(max_replicas=400, slots=32)
    await ensure_streams(js, replace(policy, limits={Stage.DOWNLOAD: limits}))

    after = await js.consumer_info(DL.stream, DL.consumer(Lane.BULK))
    assert after.config.max_waiting == limits.max_waiting == 16_000
    assert after.config.max_ack_pending == limits.max_ack_pending == 16_000
    async with asyncio.timeout(120):
        await worker  # ends once every message was seen (an assertion in it fails the test)
    assert sorted(seen) == list(range(1, N + 1))
    assert set(seen.values()) == {1}
    assert (await js.stream_info(DL.stream)).state.messages == 0


async def test_an_unchanged_policy_keeps_the_consumer(
    js: JetStreamContext, policy: StreamPolicy
) -> None:
    first = await js.consumer_info(DL.stream, DL.consumer(Lane.BULK))
    await ensure_streams(js, policy)
    again = await js.consumer_info(DL.stream, DL.consumer(Lane.BULK))
    assert again.created == first.created


async def test_max_ack_pending_changes_in_place(js: JetStreamContext, policy: StreamPolicy) -> None:
    await js.publish(DL.subject(Lane.BULK), b"x")
    first = await js.consumer_info(DL.stream, DL.consumer(Lane.BULK))
    grown = replace(policy, max_ack_pending=5000)
    await ensure_streams(js, grown)
    again = await js.consumer_info(DL.stream, DL.consumer(Lane.BULK))
    assert again.config.max_ack_pending == 5000
    assert again.created == first.created and again.num_pending == 1
