"""Stream and consumer setup, and backlog reads: the one place both the operator
and the local runner (`tagpipe up`) go through. Services only publish and consume.

Settings here are explicit because JetStream's defaults bite: MaxAckPending
silently stalls delivery, MaxDeliver is unlimited, and the dedupe window is only
two minutes. See the README's "JetStream policy" section.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from tagpipe_common.advisories import delete_advisories, ensure_advisories
from tagpipe_common.flowlimits import ConsumerLimits
from tagpipe_common.nats_io import ensure_stream
from tagpipe_common.settings import CommonSettings
from tagpipe_common.subjects import LANES, Lane, Stage, StageNames, partition_names


@dataclass(frozen=True)
class StreamPolicy:
    prefix: str = "tagpipe"
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 1000
    max_waiting: int = 512
    dedupe_window_s: float = 120.0
    max_msg_bytes: int = 8 * 1024 * 1024
    max_msgs: int = -1
    replicas: int = 1
    # Streams per stage (subjects.partition_names); 1 is the unpartitioned pipeline.
    partitions: int = 1
    # Downloads can be slow; the downloader also extends leases with in_progress().
    ack_wait_overrides: dict[Stage, float] = field(default_factory=lambda: {Stage.DOWNLOAD: 60.0})
    # Per-stage limits that follow the deployment (flowlimits.consumer_limits); a
    # stage without one gets max_ack_pending / max_waiting above.
    limits: dict[Stage, ConsumerLimits] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, s: CommonSettings) -> StreamPolicy:
        return cls(
            prefix=s.prefix,
            ack_wait_s=s.ack_wait_s,
            max_deliver=s.max_deliver,
            max_ack_pending=s.max_ack_pending,
            dedupe_window_s=s.dedupe_window_s,
            max_msg_bytes=s.max_msg_bytes,
            max_msgs=s.stream_max_msgs,
            replicas=s.stream_replicas,
            partitions=s.partitions,
        )

    def names(self, stage: Stage) -> list[StageNames]:
        """Each partition's names for `stage`, partition 0 first."""
        return partition_names(stage, self.prefix, self.partitions)

    def stream_config(self, stage: Stage, partition: int = 0) -> StreamConfig:
        names = self.names(stage)[partition]
        return StreamConfig(
            name=names.stream,
            subjects=names.subjects,
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,  # a full queue refuses new work instead of losing old work
            duplicate_window=self.dedupe_window_s,
            max_msg_size=self.max_msg_bytes,
            max_msgs=self.max_msgs,
            num_replicas=self.replicas,
        )

    def consumer_config(self, stage: Stage, lane: Lane, partition: int = 0) -> ConsumerConfig:
        names = self.names(stage)[partition]
        lim = self.limits.get(stage, ConsumerLimits(self.max_ack_pending, self.max_waiting))
        return ConsumerConfig(
            durable_name=names.consumer(lane),
            filter_subject=names.subject(lane),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_overrides.get(stage, self.ack_wait_s),
            max_deliver=self.max_deliver,
            max_ack_pending=lim.max_ack_pending,
            max_waiting=lim.max_waiting,
        )


async def ensure_streams(js: JetStreamContext, policy: StreamPolicy) -> None:
    """Create or update every partition's stream and durable consumers. Safe to
    call repeatedly; raising the partition count adds streams, and the workers
    and publishers that read the same count use them."""
    for stage in Stage:
        for part in range(policy.partitions):
            cfg = policy.stream_config(stage, part)
            assert cfg.name is not None
            await ensure_stream(js, cfg)
            for lane in LANES:
                await ensure_consumer(js, cfg.name, policy.consumer_config(stage, lane, part))
    # Where a message whose last delivery died is announced (advisories.py, stranded.py).
    await ensure_advisories(js, policy)


async def ensure_consumer(js: JetStreamContext, stream: str, want: ConsumerConfig) -> None:
    """Create or update one durable consumer; replace it where it cannot update.

    CONSUMER.CREATE with an existing durable's name updates the editable fields
    (ack_wait, max_deliver, max_ack_pending, ...) on nats-server 2.10+, but not
    max_waiting: a consumer whose max_waiting must change is replaced
    (`replace_consumer`), so the limits follow the deployment.
    """
    assert want.durable_name is not None
    try:
        have = await js.consumer_info(stream, want.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, want)
        return
    if have.config.max_waiting not in (None, want.max_waiting):
        await replace_consumer(js, stream, want, float(want.ack_wait or 30.0))
        return
    await js.add_consumer(stream, want)


# A replaced consumer's pause outlasts its drain by this much: were the replacement
# cut off, delivery resumes by itself.
PAUSE_SLACK_S = 60.0


async def replace_consumer(
    js: JetStreamContext, stream: str, want: ConsumerConfig, drain_timeout_s: float
) -> None:
    """Delete and re-create a durable without losing or re-delivering a message.

    On a work-queue stream a message stays stored until it is acked, so a new
    consumer with DeliverPolicy.ALL delivers everything not yet acked: nothing
    is lost. What must not happen is a second delivery of a message a worker
    still holds: the consumer is paused first (nats-server 2.11+; nothing new is
    delivered), and deleted only once its acks pending reach 0, i.e. every held
    message was acked or NAKed. Should workers hold past `drain_timeout_s` (one
    ack wait), it goes ahead: those messages are redelivered once, and results
    stay exactly-once (results.py), as after any ack-wait expiry.

    A call cut off while it drains (the operator's NATS calls have a timeout of a
    few seconds) leaves the consumer paused; the next call keeps that pause's
    deadline instead of starting a new one. A paused consumer redelivers nothing,
    so a message held by a dead worker stays pending for good: with a deadline
    renewed on every call it would never be replaced, and stay paused.
    """
    name = want.durable_name
    assert name is not None
    loop = asyncio.get_running_loop()
    info = await js.consumer_info(stream, name)
    if info.paused and info.pause_remaining is not None:
        # nanoseconds; PAUSE_SLACK_S of the pause is past the drain deadline
        left = float(info.pause_remaining) / 1e9 - PAUSE_SLACK_S
    else:
        until = datetime.now(UTC) + timedelta(seconds=drain_timeout_s + PAUSE_SLACK_S)
        await js.pause_consumer(stream, name, until.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        left = drain_timeout_s
    deadline = loop.time() + left
    while loop.time() < deadline:
        info = await js.consumer_info(stream, name)
        if not info.num_ack_pending:
            break
        await asyncio.sleep(0.2)
    await js.delete_consumer(stream, name)
    await js.add_consumer(stream, want)


async def delete_streams(js: JetStreamContext, prefix: str, partitions: int = 1) -> list[str]:
    """Remove a pipeline's streams, its advisory stream last (deletionPolicy:
    Delete). Returns what was deleted.

    Past `partitions` it goes on while further partitions exist, so streams left
    by a higher count set earlier go too."""
    deleted = []
    for stage in Stage:
        k = 0
        while True:
            name = partition_names(stage, prefix, k + 1)[k].stream
            try:
                await js.delete_stream(name)
            except NotFoundError:
                if k >= partitions - 1:
                    break
            else:
                deleted.append(name)
            k += 1
    return deleted + await delete_advisories(js, prefix)


async def unread_partitions(js: JetStreamContext, policy: StreamPolicy) -> dict[str, int]:
    """Streams past the policy's partition count that still hold messages: left by
    a higher count, read by no worker now. {stream: messages}; {} when none."""
    out = {}
    for stage in Stage:
        k = policy.partitions
        while True:
            name = partition_names(stage, policy.prefix, k + 1)[k].stream
            try:
                info = await js.stream_info(name)
            except NotFoundError:
                break
            if info.state.messages:
                out[name] = int(info.state.messages)
            k += 1
    return out


async def consumer_backlog(
    js: JetStreamContext, stage: Stage, lane: Lane, prefix: str, partitions: int = 1
) -> int:
    """KEDA's lag: pending plus delivered-but-unacked (waiting for redelivery),
    summed over the stage's partitions.

    Read through the JetStream API, which the consumer leader answers, never a
    monitoring endpoint of an arbitrary node (stale follower reads, keda#3860).
    Raises NotFoundError when a consumer is missing: callers must hold, not
    guess (keda#7668 scaled to max on exactly that).
    """
    reads = [
        js.consumer_info(n.stream, n.consumer(lane))
        for n in partition_names(stage, prefix, partitions)
    ]
    infos = await asyncio.gather(*reads)
    return sum(int(i.num_pending or 0) + int(i.num_ack_pending or 0) for i in infos)


async def stage_backlog(
    js: JetStreamContext, stage: Stage, prefix: str, partitions: int = 1
) -> int:
    reads = [consumer_backlog(js, stage, lane, prefix, partitions) for lane in LANES]
    return sum(await asyncio.gather(*reads))


@dataclass(frozen=True)
class StageCounters:
    """A stage's monotonic counters, for rates over a window (the operator's rate term)."""

    published: int
    """Every message ever stored in the stage's stream: its last sequence number."""
    removed: int
    """Messages no longer stored: WorkQueue retention removes a message on its ack (or term)."""
    pending: int
    """Not yet delivered, over the stage's consumers."""
    ack_pending: int
    """Delivered and not yet acked, over the stage's consumers."""


async def stage_counters(
    js: JetStreamContext, stage: Stage, prefix: str, partitions: int = 1
) -> StageCounters:
    """Each partition's stream info and its lanes' consumer infos, read
    concurrently and summed (a stream's sequence counts only its own messages,
    so the partitions' counters add up).

    Through the JetStream API, as `consumer_backlog`; raises NotFoundError when a
    stream or a consumer is missing, so callers hold instead of guessing.
    """
    names = partition_names(stage, prefix, partitions)
    streams = await asyncio.gather(*(js.stream_info(n.stream) for n in names))
    consumers = await asyncio.gather(
        *(js.consumer_info(n.stream, n.consumer(lane)) for n in names for lane in LANES)
    )
    last = sum(int(s.state.last_seq or 0) for s in streams)
    stored = sum(int(s.state.messages or 0) for s in streams)
    return StageCounters(
        published=last,
        removed=last - stored,
        pending=sum(int(c.num_pending or 0) for c in consumers),
        ack_pending=sum(int(c.num_ack_pending or 0) for c in consumers),
    )


async def lane_backlogs(js: JetStreamContext, prefix: str, partitions: int = 1) -> dict[Lane, int]:
    """Each lane's backlog summed over every stage and partition (read concurrently)."""
    pairs = [(stage, lane) for stage in Stage for lane in LANES]
    counts = await asyncio.gather(
        *(consumer_backlog(js, s, ln, prefix, partitions) for s, ln in pairs)
    )
    out = dict.fromkeys(LANES, 0)
    for (_, lane), n in zip(pairs, counts, strict=True):
        out[lane] += n
    return out


async def pipeline_backlog(js: JetStreamContext, prefix: str, partitions: int = 1) -> int:
    """Every stage's backlog: what a stalled tier anywhere downstream adds up to."""
    return sum((await lane_backlogs(js, prefix, partitions)).values())


def delivery_count(msg: Msg) -> int:
    return int(msg.metadata.num_delivered or 1)


def is_final_delivery(msg: Msg, max_deliver: int) -> bool:
    """True on the last attempt JetStream will make.

    A message that reaches MaxDeliver stays in the stream, unseen, by design; so
    a worker that fails on the final attempt writes an error result and acks
    instead of NAKing, and the item is never lost in limbo.
    """
    return delivery_count(msg) >= max_deliver


async def give_back_buffered(sub: JetStreamContext.PullSubscription) -> int:
    """NAK the messages a pull subscription holds unread, then unsubscribe.

    A message the server sent for a fetch that had already timed out waits in
    nats.py's pending queue for the next fetch. A worker that stops would drop it
    with the subscription, unacked, and JetStream would hold it until its ack wait
    ran out (seen on SIGTERM of an inference container: 62-65 items, 30 s+). Given
    back at once, another replica takes it now. Returns how many were given back.
    """
    queue = sub._sub._pending_queue  # nats.py keeps no public way to read it
    given = 0
    while not queue.empty():
        msg = queue.get_nowait()
        if JetStreamContext.is_status_msg(msg) is None:
            with contextlib.suppress(Exception):
                await msg.nak()
                given += 1
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    return given
