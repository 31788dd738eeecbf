"""What the workers and the JetStream consumers must agree on, from one source.

The TagPipeline is that source: `spec.nats.maxDeliver` and `ackWaitSeconds` go to
every consumer (`stream_policy`) and, as TAGPIPE_* environment, to every worker
(`agreed_env`, in the shared ConfigMap); so does `spec.nats.partitions`, the
streams per stage that the gateway publishes over and every worker pulls from.
Each stage's consumer limits follow its maximum replicas x slots
(tagpipe_common.flowlimits), shared over its partitions, so the tier's
in-flight work is never capped below what its replicas can hold.

A hand-set value that contradicts this is refused, never silently capped
(`problems`): a stage `env` that sets an agreed setting, an operator environment
`TAGPIPE_MAX_ACK_PENDING` below what a stage's maxima imply, and maxima that the
stage's partitions cannot hold (the condition names the partitions needed).
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import replace

from tagpipe_common.flowlimits import (
    MAX_PER_CONSUMER,
    ConsumerLimits,
    check_override,
    consumer_limits,
    in_flight,
    partitions_needed,
)
from tagpipe_common.settings import CommonSettings
from tagpipe_common.streams import StreamPolicy
from tagpipe_common.subjects import Stage

from tagpipe_operator.spec import StageSpec, TagPipelineSpec

# Downloads run long and extend their lease while they run (the downloader's
# progress interval); their consumer never waits less than this.
MIN_DOWNLOAD_ACK_WAIT_S = 60

AGREED_ENV = frozenset(
    {
        "TAGPIPE_PREFIX",
        "TAGPIPE_MAX_DELIVER",
        "TAGPIPE_ACK_WAIT_S",
        "TAGPIPE_MAX_ACK_PENDING",
        "TAGPIPE_STREAM_REPLICAS",
        "TAGPIPE_PARTITIONS",
    }
)
"""Settings a stage's `env` may not set: streams and every worker read them alike."""


def _stages(spec: TagPipelineSpec) -> dict[Stage, tuple[str, StageSpec]]:
    return {
        Stage.DOWNLOAD: ("downloader", spec.downloader),
        Stage.INFER: ("inference", spec.inference),
    }


def stage_limits(spec: TagPipelineSpec, floor: int | None = None) -> dict[Stage, ConsumerLimits]:
    """Each stage's consumer limits (each partition's) from its maximum replicas x
    slots; `floor`: a max_ack_pending the operator's environment asks for at least."""
    out = {}
    for stage, (_, st) in _stages(spec).items():
        lim = consumer_limits(*_maxima(st), spec.nats.partitions)
        if floor is not None and floor > lim.max_ack_pending:
            lim = replace(lim, max_ack_pending=floor)
        out[stage] = lim
    return out


def _maxima(st: StageSpec) -> tuple[int, int]:
    """(maximum replicas, slots per replica): what a stage's consumers must hold."""
    return max(st.replicas.max, st.replicas.min), st.in_flight_per_replica() or 1


def _ack_pending_floor(settings: CommonSettings) -> int | None:
    return settings.max_ack_pending if "max_ack_pending" in settings.model_fields_set else None


def stream_policy(settings: CommonSettings, spec: TagPipelineSpec) -> StreamPolicy:
    """The streams and consumers of one TagPipeline, agreed with `agreed_env`."""
    ack_wait = float(spec.nats.ack_wait_seconds)
    return replace(
        StreamPolicy.from_settings(settings),
        prefix=spec.nats.prefix,
        replicas=spec.nats.stream_replicas,
        max_deliver=spec.nats.max_deliver,
        ack_wait_s=ack_wait,
        ack_wait_overrides={Stage.DOWNLOAD: max(float(MIN_DOWNLOAD_ACK_WAIT_S), ack_wait)},
        partitions=spec.nats.partitions,
        limits=stage_limits(spec, _ack_pending_floor(settings)),
    )


def agreed_env(spec: TagPipelineSpec) -> dict[str, str]:
    """The TAGPIPE_* every worker gets, from the fields `stream_policy` reads."""
    return {
        "TAGPIPE_MAX_DELIVER": str(spec.nats.max_deliver),
        "TAGPIPE_ACK_WAIT_S": str(spec.nats.ack_wait_seconds),
        "TAGPIPE_PARTITIONS": str(spec.nats.partitions),
    }


def problems(spec: TagPipelineSpec, settings: CommonSettings) -> list[str]:
    """Why this TagPipeline's flow control cannot be applied as asked; [] when it can."""
    out = []
    stages = {"gateway": spec.gateway, "downloader": spec.downloader, "inference": spec.inference}
    for component, st in stages.items():
        for name in sorted({e.name for e in st.env} & AGREED_ENV):
            field = "spec.nats" if name != "TAGPIPE_MAX_ACK_PENDING" else "the stage's replicas"
            out.append(
                f"{component}.env sets {name}, which streams and workers must agree on: "
                f"set it through {field} instead"
            )
    floor = _ack_pending_floor(settings)
    for stage, lim in stage_limits(spec).items():
        component, st = _stages(spec)[stage]
        if (needed := partitions_needed(*_maxima(st))) > lim.partitions:
            out.append(
                f"{component}: {in_flight(*_maxima(st)):,} messages in flight at its maximum "
                f"replicas need {needed} partitions of at most {MAX_PER_CONSUMER:,} each, "
                f"and spec.nats.partitions is {lim.partitions}: set it to {needed} or more, "
                f"or lower replicas.max or the slots"
            )
        if floor is not None and (msg := check_override("max_ack_pending", floor, lim)):
            operator_env = "the operator's TAGPIPE_MAX_ACK_PENDING"
            out.append(f"{component}: {msg.replace('max_ack_pending', operator_env, 1)}")
    return out


__all__ = ["AGREED_ENV", "agreed_env", "problems", "stage_limits", "stream_policy"]
