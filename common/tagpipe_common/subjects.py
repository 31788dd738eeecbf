"""Every JetStream stream, subject, consumer and header name, in one place.

Real-time and bulk traffic share a stream per stage but travel on separate
subjects with separate durable consumers, so a worker can always drain the
real-time consumer first: that is how real-time work jumps the bulk queue.

A stage may be split into partitions: several streams, each with its own
subjects and consumers, so that no one stream leader carries the whole stage
(`partition_names`). Partition 0 keeps the unpartitioned names, so a pipeline
with one partition is exactly what it was before partitions existed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import StrEnum


class Lane(StrEnum):
    REALTIME = "realtime"
    BULK = "bulk"


# Order matters: workers poll lanes in this order.
LANES: tuple[Lane, ...] = (Lane.REALTIME, Lane.BULK)


class Stage(StrEnum):
    DOWNLOAD = "download"
    INFER = "infer"


@dataclass(frozen=True)
class StageNames:
    stream: str
    subject_prefix: str

    def subject(self, lane: Lane) -> str:
        return f"{self.subject_prefix}.{lane.value}"

    def consumer(self, lane: Lane) -> str:
        return f"{self.stream.lower()}-{lane.value}"

    @property
    def subjects(self) -> list[str]:
        return [self.subject(lane) for lane in LANES]


def stage_names(stage: Stage, prefix: str = "tagpipe") -> StageNames:
    """Names for one stage; `prefix` lets several pipelines share one NATS."""
    return StageNames(
        stream=f"{prefix.upper()}_{stage.value.upper()}",
        subject_prefix=f"{prefix}.{stage.value}",
    )


def partition_names(stage: Stage, prefix: str = "tagpipe", partitions: int = 1) -> list[StageNames]:
    """Every partition's names, partition 0 first: TAGPIPE_DOWNLOAD, then
    TAGPIPE_DOWNLOAD_P1 on subjects tagpipe.download.p1.<lane>, and so on.

    The one place partition names are made: stream setup, publishers, workers,
    backlog reads and advisory listeners all enumerate partitions through it.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    base = stage_names(stage, prefix)
    return [base] + [
        StageNames(f"{base.stream}_P{k}", f"{base.subject_prefix}.p{k}")
        for k in range(1, partitions)
    ]


def partition_of(item_id: str, partitions: int) -> int:
    """The partition an item travels in, at every stage.

    A stable hash (crc32, not Python's salted `hash`): every gateway replica and
    every republish of the same item picks the same stream, so the stream's
    `Nats-Msg-Id` dedupe still sees a repeat as a repeat.
    """
    if partitions <= 1:
        return 0
    return zlib.crc32(item_id.encode()) % partitions


# NATS headers
HDR_MSG_ID = "Nats-Msg-Id"  # JetStream dedupe inside the stream's duplicate window
HDR_TRACEPARENT = "traceparent"  # W3C trace context, propagated by hand (nats-py has no OTel)
HDR_TRACESTATE = "tracestate"
HDR_SCHEMA = "Tagpipe-Schema"  # message schema version, readable without parsing the body
