"""Every JetStream stream, subject, consumer and header name, in one place.

Real-time and bulk traffic share a stream per stage but travel on separate
subjects with separate durable consumers, so a worker can always drain the
real-time consumer first: that is how real-time work jumps the bulk queue.
"""

from __future__ import annotations

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


# NATS headers
HDR_MSG_ID = "Nats-Msg-Id"  # JetStream dedupe inside the stream's duplicate window
HDR_TRACEPARENT = "traceparent"  # W3C trace context, propagated by hand (nats-py has no OTel)
HDR_TRACESTATE = "tracestate"
HDR_SCHEMA = "Tagpipe-Schema"  # message schema version, readable without parsing the body
