"""The live view of the pipeline (what `tagpipe status` shows)."""

from __future__ import annotations

from fastapi import APIRouter

from tagpipe_gateway.deps import PrincipalDep, RuntimeDep
from tagpipe_gateway.pipeline import PipelineView, pipeline_view
from tagpipe_gateway.problems import problem_responses

router = APIRouter(prefix="/v1/pipeline", tags=["pipeline"])


@router.get(
    "",
    response_model=PipelineView,
    summary="Live view of the pipeline",
    description=(
        "Per stage: backlog, in flight, images/s over the last minute, mean batch size and "
        "live workers; and the caller's running jobs with their progress. Poll it (about "
        "every 2 s, the workers' reporting period) for a live view."
    ),
    responses=problem_responses(401, 503),
)
async def get_pipeline(rt: RuntimeDep, principal: PrincipalDep) -> PipelineView:
    return await pipeline_view(rt, principal)
