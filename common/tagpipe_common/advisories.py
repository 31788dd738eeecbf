"""The MAX_DELIVERIES advisories of a pipeline's work streams, captured in a stream.

A message whose last delivery dies with its worker (OOM, SIGKILL, a poison
image that kills the process) is never delivered again and stays in its
work-queue stream, unseen: its job would never complete. JetStream says so once,
in a `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>` advisory,
a core NATS message that is gone unless someone listens at that moment. So the
advisories of the pipeline's streams are kept in `{PREFIX}_ADVISORIES`, and each
stage's workers read theirs through a durable consumer (stranded.py), so an
advisory outlives any worker.

Subjects name each work stream (every partition, subjects.partition_names) with
a wildcard consumer, so every consumer of a stage (both lanes) is covered, and
pipelines sharing one NATS never overlap.
`ensure_advisories` runs inside `streams.ensure_streams`: the operator and
`tagpipe up` create this stream with the work streams, from the same policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

from tagpipe_common.nats_io import ensure_stream
from tagpipe_common.settings import MAX_PARTITIONS
from tagpipe_common.subjects import Stage, partition_names

if TYPE_CHECKING:
    from tagpipe_common.streams import StreamPolicy

MAX_DELIVERIES_SUBJECT = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
ADVISORY_TYPE = "io.nats.jetstream.advisory.v1.max_deliver"

# Kept after they are handled (limits retention): a week of "which items were
# stranded" to read with `nats stream view`, and a stage with no worker running
# for days still finds its advisories. Bounded in count and bytes too: a crash
# loop on a bad release must not grow the stream without end.
ADVISORY_MAX_AGE_S = 7 * 86400.0
ADVISORY_MAX_MSGS = 1_000_000
ADVISORY_MAX_BYTES = 64 * 1024 * 1024  # ~250 bytes an advisory
# A handled advisory is acked; one whose handling failed (Redis away) is NAKed and
# comes back after this delay, for as long as it takes: giving up would strand
# the item again, and handling one is cheap (a read, a result write, a delete).
ADVISORY_ACK_WAIT_S = 30.0


def advisory_stream(prefix: str) -> str:
    return f"{prefix.upper()}_ADVISORIES"


def advisory_consumer(prefix: str, stage: Stage) -> str:
    return f"{advisory_stream(prefix).lower()}-{stage.value}"


def stage_streams(stage: Stage, prefix: str) -> list[str]:
    """The work streams whose stranded messages this stage's workers settle: every
    partition a pipeline may have, not just the current count, so the advisory
    stream never changes with it and a stream left over from a larger count while
    it drains is still covered."""
    return [n.stream for n in partition_names(stage, prefix, MAX_PARTITIONS)]


def stage_advisory_subjects(stage: Stage, prefix: str) -> list[str]:
    return [f"{MAX_DELIVERIES_SUBJECT}.{s}.*" for s in stage_streams(stage, prefix)]


def advisory_stream_config(policy: StreamPolicy) -> StreamConfig:
    subjects = [s for stage in Stage for s in stage_advisory_subjects(stage, policy.prefix)]
    return StreamConfig(
        name=advisory_stream(policy.prefix),
        subjects=subjects,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=ADVISORY_MAX_AGE_S,
        max_msgs=ADVISORY_MAX_MSGS,
        max_bytes=ADVISORY_MAX_BYTES,
        num_replicas=policy.replicas,
    )


def advisory_consumer_config(policy: StreamPolicy, stage: Stage) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=advisory_consumer(policy.prefix, stage),
        filter_subjects=stage_advisory_subjects(stage, policy.prefix),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ADVISORY_ACK_WAIT_S,
        max_deliver=-1,  # see ADVISORY_ACK_WAIT_S
        max_ack_pending=1000,
    )


async def ensure_advisories(js: JetStreamContext, policy: StreamPolicy) -> None:
    """Create or update the advisory stream and a durable consumer per stage."""
    cfg = advisory_stream_config(policy)
    assert cfg.name is not None
    await ensure_stream(js, cfg)
    for stage in Stage:
        # CONSUMER.CREATE on an existing durable updates it (filter subjects included).
        await js.add_consumer(cfg.name, advisory_consumer_config(policy, stage))


async def delete_advisories(js: JetStreamContext, prefix: str) -> list[str]:
    try:
        await js.delete_stream(advisory_stream(prefix))
    except NotFoundError:
        return []
    return [advisory_stream(prefix)]


@dataclass(frozen=True)
class MaxDeliveries:
    """One advisory: message `stream_seq` of `stream` was delivered `deliveries`
    times by `consumer`, and never acked."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int

    @classmethod
    def parse(cls, data: bytes) -> MaxDeliveries | None:
        """None for anything that is not a max-deliveries advisory."""
        try:
            doc = json.loads(data)
            if doc.get("type") != ADVISORY_TYPE:
                return None
            return cls(
                str(doc["stream"]),
                str(doc["consumer"]),
                int(doc["stream_seq"]),
                int(doc.get("deliveries", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
