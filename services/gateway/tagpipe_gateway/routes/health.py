"""Liveness, readiness and metrics: open without an API key."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tagpipe_common.subjects import Stage, partition_names

from tagpipe_gateway.deps import RuntimeDep
from tagpipe_gateway.problems import PROBLEM_MEDIA_TYPE, Problem, ProblemCode, problem_response
from tagpipe_gateway.runtime import Runtime
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
    summary="Readiness: this gateway serves requests (its dependencies are not asked)",
)
async def readyz(rt: RuntimeDep) -> Health:
    """Ready while the process serves, whatever NATS and Redis are doing.

    A NATS or Redis outage (a Sentinel failover, a restart) reaches every gateway at
    once: failing readiness on it would take every gateway out of the Service together,
    and clients would meet connection errors instead of the request path's 503
    problem+json with Retry-After. So this probe does no I/O; it only reports whether
    the NATS connection is up. `/readyz/dependencies` asks the dependencies.
    """
    return Health(status="ok", checks={"nats": _nats_state(rt)})


def _nats_state(rt: Runtime) -> str:
    return "connected" if rt.nc.is_connected else "error: disconnected"


@router.get(
    "/readyz/dependencies",
    response_model=Health,
    summary="Dependencies: NATS and Redis reachable, streams present",
    responses={
        503: {
            "model": Problem,
            "description": "A dependency failed: `checks` names it",
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    },
)
async def dependencies(rt: RuntimeDep) -> Response | Health:
    """For people, monitoring and `helm test`; never a Kubernetes probe (see readyz)."""
    probes = [_check("redis", rt.redis.ping())]
    if not rt.nc.is_connected:
        checks = {"nats": _nats_state(rt)}
    else:
        checks = {}
        for stage in Stage:
            for names in partition_names(stage, rt.settings.prefix, rt.settings.partitions):
                probes.append(_check(f"stream {names.stream}", rt.js.stream_info(names.stream)))
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
            instance="/readyz/dependencies",
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
