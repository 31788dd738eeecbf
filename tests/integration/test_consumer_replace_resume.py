"""A consumer replacement cut off while it drains (the operator's NATS calls time
out after a few seconds, every tick) on a real nats-server: the next attempts keep
the first pause's deadline, so a message held by a dead worker, which a paused
consumer never redelivers, cannot keep the consumer paused for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest
from nats.js.client import JetStreamContext
from tagpipe_common.flowlimits import ConsumerLimits
from tagpipe_common.streams import StreamPolicy, ensure_consumer, ensure_streams
from tagpipe_common.subjects import Lane, Stage, stage_names

pytestmark = pytest.mark.integration

INF = stage_names(Stage.INFER)


async def test_a_cut_off_replacement_goes_ahead_at_its_first_deadline(
    js: JetStreamContext,
) -> None:
    policy = StreamPolicy(prefix="tagpipe", ack_wait_s=1.0, max_deliver=3)
    await ensure_streams(js, policy)
    await js.publish(INF.subject(Lane.BULK), b"held")
    dead = await js.pull_subscribe_bind(INF.consumer(Lane.BULK), INF.stream)
    [held] = await dead.fetch(1, timeout=5.0)  # its worker dies: never acked
    await dead.unsubscribe()
    grown = replace(policy, limits={Stage.INFER: ConsumerLimits(2000, 1024)})
    want = grown.consumer_config(Stage.INFER, Lane.BULK)
    # Operator ticks: each attempt is cut off well inside the 1 s drain.
    for _ in range(40):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                await ensure_consumer(js, INF.stream, want)
        info = await js.consumer_info(INF.stream, INF.consumer(Lane.BULK))
        if info.config.max_waiting == 1024:
            break
        await asyncio.sleep(0.1)
    assert info.config.max_waiting == 1024, "still the old consumer: paused for ever"
    assert not info.paused
    # The held message was not lost: the new consumer delivers it again.
    sub = await js.pull_subscribe_bind(INF.consumer(Lane.BULK), INF.stream)
    [again] = await sub.fetch(1, timeout=5.0)
    assert again.data == held.data == b"held"
    await again.ack()
