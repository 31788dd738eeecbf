"""A tiny HTTP health endpoint for the kubelet: /healthz (alive) and /readyz (serving).

Ready means the model is loaded, a warm-up batch has run and the worker is
consuming; a pod that is still loading its model gets no traffic-based scaling
credit and no rollout progress.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web


def health_app(is_ready: Callable[[], bool]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if is_ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_health(host: str, port: int, is_ready: Callable[[], bool]) -> web.AppRunner:
    runner = web.AppRunner(health_app(is_ready), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
