"""Liveness, readiness and metrics: open without an API key."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tagpipe_common.subjects import Stage, stage_names

from tagpipe_gateway.deps import RuntimeDep
from tagpipe_gateway.problems import PROBLEM_MEDIA_TYPE, Problem, ProblemCode, problem_response
from tagpipe_gateway.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process serves HTTP")
async def healthz() -> Health:
    return Health(status="ok")


async def _check(name: str, probe: asyncio.Future[object] | object) -> tuple[str, str]:
    try:
        await asyncio.wait_for(probe, 2.0)  # type: ignore[arg-type]
    except Exception as exc:
        return name, f"error: {type(exc).__name__}"
    return name, "ok"


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: NATS and Redis reachable, streams present",
    responses={
        503: {
            "model": Problem,
            "description": "Not ready: `checks` names the dependency that failed",
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    },
)
async def readyz(rt: RuntimeDep) -> Response | Health:
    probes = [_check("redis", rt.redis.ping())]
    if not rt.nc.is_connected:
        checks = {"nats": "error: disconnected"}
    else:
        checks = {}
        for stage in Stage:
            name = stage_names(stage, rt.settings.prefix).stream
            probes.append(_check(f"stream {name}", rt.js.stream_info(name)))
    checks.update(dict(await asyncio.gather(*probes)))
    health = Health(
        status="ok" if all(v == "ok" for v in checks.values()) else "unavailable", checks=checks
    )
    if health.status != "ok":
        failed = sorted(k for k, v in checks.items() if v != "ok")
        return problem_response(
            503,
            ProblemCode.NOT_READY,
            "Not ready",
            f"unavailable: {', '.join(failed)}",
            instance="/readyz",
            checks=checks,
        )
    return health


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_model=str,
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
