"""The FastAPI application: routers, problem handlers, metrics, lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tagpipe_gateway import __version__, openapi
from tagpipe_gateway.auth import ApiKeys
from tagpipe_gateway.drain import Drain
from tagpipe_gateway.early import EarlyAdmission
from tagpipe_gateway.load import LoadReporter
from tagpipe_gateway.metrics import install_middleware
from tagpipe_gateway.problems import install_handlers
from tagpipe_gateway.routes import health, jobs, manifest_jobs, pipeline, tags
from tagpipe_gateway.runtime import Runtime
from tagpipe_gateway.settings import GatewaySettings

DESCRIPTION = """\
Tag images with an image classifier, one request at a time (`/v1/tags`) or in
bulk jobs of any size (`/v1/jobs`).

Errors are RFC 9457 `application/problem+json` documents; match on their `code`.
Send the API key as `Authorization: Bearer <key>` (health and metrics are open).
"""


def create_app(settings: GatewaySettings, api_keys: ApiKeys | None = None) -> FastAPI:
    keys = api_keys if api_keys is not None else ApiKeys(())
    drain = Drain()  # set on SIGTERM by DrainingServer (__main__); see drain.py

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain.bind(asyncio.get_running_loop())
        runtime = await Runtime.start(settings, keys)
        app.state.runtime = runtime
        load = LoadReporter(runtime.js, settings.prefix, settings.stream_replicas)
        load.start()
        try:
            yield
        finally:
            await load.close()  # first: the operator stops counting this gateway at once
            await runtime.close()

    app = FastAPI(
        title="tagpipe",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,
    )
    app.state.drain = drain
    install_handlers(app)
    install_middleware(app)
    app.add_middleware(EarlyAdmission)  # outermost: a refusal costs nothing inside
    app.include_router(health.router)
    app.include_router(tags.router)
    app.include_router(jobs.router)
    app.webhooks.include_router(jobs.webhooks)
    app.include_router(manifest_jobs.router)
    app.include_router(pipeline.router)
    openapi.install(app)
    return app
