"""Flow-control limits that follow the deployment, as pure functions.

A JetStream consumer's `max_ack_pending` caps how many messages the whole tier
holds unacked, whatever the replica count: a fixed 1,000 caps 400 downloaders
x 32 slots at 1,000 downloads in flight. So each consumer's limits are derived
from the stage's maximum replicas x slots (messages one busy replica holds),
with headroom for a rollout's surge, and never set below the old fixed values.

`max_waiting` (outstanding pull requests) follows the same rule: every slot may
have a fetch waiting when the stream runs dry. nats-server refuses to change it
on an existing consumer, so whoever applies these limits must replace the
consumer when it grows.

Where one consumer would have to hold more than `MAX_PER_CONSUMER`, a stage is
split into partitions (several streams, subjects.partition_names), each with its
share plus `PARTITION_SKEW`: items spread by a hash, never exactly evenly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HEADROOM = 1.25
"""A rolling update runs old and new pods side by side (maxSurge 25 %)."""

FLOOR_ACK_PENDING = 1000
FLOOR_WAITING = 512
"""The limits before they followed the deployment: a small pipeline keeps them."""

MAX_PER_CONSUMER = 100_000
"""The most unacked messages one consumer is given. Each pending ack is state the
consumer leader keeps and replicates (R3); beyond this a stage gets partitions
instead. It is the bound the settings always had (TAGPIPE_MAX_ACK_PENDING)."""


PARTITION_SKEW = 1.2
"""A partition's consumer holds this much more than an even share (capped at
MAX_PER_CONSUMER): a hash spreads a job's items unevenly, and a tier that finds
one partition fuller than the others may hold more of it for a while."""


@dataclass(frozen=True)
class ConsumerLimits:
    max_ack_pending: int
    max_waiting: int
    partitions: int = 1


def in_flight(max_replicas: int, slots: int) -> int:
    """Messages a stage's tier may hold unacked at its maximum, with headroom."""
    if max_replicas < 1 or slots < 1:
        raise ValueError(f"replicas ({max_replicas}) and slots ({slots}) must be >= 1")
    return math.ceil(HEADROOM * max_replicas * slots)


def partitions_needed(max_replicas: int, slots: int) -> int:
    """The fewest partitions whose consumers hold a stage's in-flight work."""
    return math.ceil(in_flight(max_replicas, slots) / MAX_PER_CONSUMER)


def consumer_limits(max_replicas: int, slots: int, partitions: int | None = None) -> ConsumerLimits:
    """Limits for each of one stage's consumers (one per partition and lane).

    `slots`: messages one busy replica holds unacked (downloader concurrency,
    inference two batches). `partitions`: how many the stage has; None, as many
    as it needs. With one partition the consumer holds the whole stage; with
    several each holds an even share plus PARTITION_SKEW. Fewer partitions than
    `partitions_needed` leave a share above MAX_PER_CONSUMER: callers refuse
    that (operator flow.problems), they never cap it silently.
    """
    need = in_flight(max_replicas, slots)
    if partitions is None:
        partitions = partitions_needed(max_replicas, slots)
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    share = math.ceil(need / partitions)
    if partitions > 1:
        share = max(share, min(MAX_PER_CONSUMER, math.ceil(share * PARTITION_SKEW)))
    return ConsumerLimits(
        max_ack_pending=max(FLOOR_ACK_PENDING, share),
        max_waiting=max(FLOOR_WAITING, share),
        partitions=partitions,
    )


def check_override(name: str, value: int, limits: ConsumerLimits) -> str | None:
    """A hand-set limit below what the deployment implies: the one-line refusal."""
    floor = limits.max_ack_pending if name == "max_ack_pending" else limits.max_waiting
    if value < floor:
        return (
            f"{name}={value} is below what the deployment implies ({floor}: "
            f"{HEADROOM} x max replicas x slots); raise it or lower the replica maximum"
        )
    return None


@dataclass(frozen=True)
class StreamLoad:
    """One stage's stream at the planned peak: what its leader must carry."""

    stream: str
    msgs_per_s: float
    msg_bytes: int
    replicas: int = 1

    @property
    def bytes_per_s(self) -> float:
        return self.msgs_per_s * self.msg_bytes

    @property
    def replicated_bytes_per_s(self) -> float:
        """What the leader sends on to its followers as well (R3: two more copies)."""
        return self.bytes_per_s * self.replicas


__all__ = [
    "FLOOR_ACK_PENDING",
    "FLOOR_WAITING",
    "HEADROOM",
    "MAX_PER_CONSUMER",
    "PARTITION_SKEW",
    "ConsumerLimits",
    "StreamLoad",
    "check_override",
    "consumer_limits",
    "in_flight",
    "partitions_needed",
]
