"""The live view of the pipeline: per stage backlog, in flight, rate, batch size, workers.

Backlog and in-flight counts come from JetStream (the consumers' num_pending and
num_ack_pending, as the autoscaler reads them); rates, batch sizes and worker counts
from the workers' pulses in Redis (tagpipe_common.pulse); jobs from the recent-jobs
index. `tagpipe status` renders it; `GET /v1/pipeline` serves it.
"""

from __future__ import annotations

import asyncio
import time

from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field
from tagpipe_common.pulse import stage_pulses
from tagpipe_common.streams import stage_counters
from tagpipe_common.subjects import Stage

from tagpipe_gateway.jobs import FINAL_STATES
from tagpipe_gateway.runtime import Runtime
from tagpipe_gateway.schemas import JobStatus
from tagpipe_gateway.submit import aw, text

SHOWN_JOBS = 20


class StageView(BaseModel):
    stage: Stage = Field(description="`download` or `infer`")
    backlog: int | None = Field(
        description="Messages waiting for a worker (null: the stream is not there yet)"
    )
    in_flight: int | None = Field(description="Delivered to a worker and not yet acked")
    images_per_s: float = Field(description="Items finished per second over the last minute")
    batch_size: float | None = Field(
        description="Mean images per batch over the last minute (inference only)"
    )
    workers: int = Field(description="Workers that reported within the last 10 s")


class PipelineView(BaseModel):
    at: float = Field(description="When this view was read (epoch seconds)")
    stages: list[StageView]
    jobs: list[JobStatus] = Field(description="The caller's jobs still running, newest first")


async def _stage(rt: Runtime, stage: Stage) -> StageView:
    backlog = in_flight = None
    try:
        counters = await stage_counters(rt.js, stage, rt.settings.prefix, rt.settings.partitions)
        backlog, in_flight = counters.pending, counters.ack_pending
    except NotFoundError:
        pass
    pulses = await stage_pulses(rt.redis, rt.keys, stage)
    batches = sum(float(p.get("batches", 0)) for p in pulses)
    images_batched = sum(float(p.get("batches", 0)) * float(p.get("batch_size", 0)) for p in pulses)
    return StageView(
        stage=stage,
        backlog=backlog,
        in_flight=in_flight,
        images_per_s=round(sum(float(p.get("images_per_s", 0)) for p in pulses), 2),
        batch_size=round(images_batched / batches, 2) if batches else None,
        workers=len(pulses),
    )


async def _running_jobs(rt: Runtime, owner: str) -> list[JobStatus]:
    ids = await aw(rt.redis.zrevrange(rt.keys.recent_jobs, 0, SHOWN_JOBS * 5 - 1))
    found = await asyncio.gather(*(rt.jobs.status(text(i), owner) for i in ids))
    running = [s for s in found if s is not None and s.state not in FINAL_STATES]
    return running[:SHOWN_JOBS]


async def pipeline_view(rt: Runtime, owner: str) -> PipelineView:
    stages = await asyncio.gather(*(_stage(rt, s) for s in Stage))
    return PipelineView(at=time.time(), stages=list(stages), jobs=await _running_jobs(rt, owner))
