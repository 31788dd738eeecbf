"""`tagpipe-downloader`: run the download worker with its health endpoints.

SIGTERM/SIGINT stop the pulling, let in-flight items finish (bounded by
TAGPIPE_DRAIN_TIMEOUT_S), then exit 0, so a rolling update loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import start_http_server
from tagpipe_common import eventloop, telemetry
from tagpipe_common.nats_io import close_nats, connect_nats, require_nats
from tagpipe_common.pulse import beating
from tagpipe_common.redis_io import connect_redis, require_redis
from tagpipe_common.settings import load_settings
from tagpipe_common.stranded import sweeping
from tagpipe_common.subjects import Stage
from tagpipe_common.threads import niced_pool

from tagpipe_downloader.fetch import Fetcher
from tagpipe_downloader.settings import DownloaderSettings
from tagpipe_downloader.worker import DownloadWorker

log = logging.getLogger("tagpipe.downloader")


def health_app(worker: DownloadWorker) -> web.Application:
    async def healthz(_req: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "inflight": worker.inflight})

    async def readyz(_req: web.Request) -> web.Response:
        problems = []
        if not worker.nc.is_connected:
            problems.append("nats disconnected")
        if not worker.bound:
            problems.append("download consumers not bound")
        for outage in (worker.nats_outage, worker.redis_outage):
            if not outage.healthy:
                problems.append(f"{outage.what}: {outage.last_error}")
        try:
            async with asyncio.timeout(1.0):
                await worker.redis.ping()  # type: ignore[misc]
        except Exception as exc:
            problems.append(f"redis: {type(exc).__name__}")
        status = 503 if problems else 200
        return web.json_response({"ready": not problems, "problems": problems}, status=status)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(settings: DownloaderSettings) -> None:
    nc = await connect_nats(settings.nats_servers, "tagpipe-downloader", settings.nats_liveness())
    redis_client = connect_redis(settings.redis_url, settings.redis_timeouts())
    pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
    bulk_pool = niced_pool(settings.decode_workers, settings.bulk_decode_nice)
    runner: web.AppRunner | None = None
    try:
        async with Fetcher(settings.fetch_config()) as fetcher:
            worker = DownloadWorker(settings, nc, redis_client, fetcher, pool, bulk_pool)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, worker.stop)
            if settings.health_port:
                runner = web.AppRunner(health_app(worker), access_log=None)
                await runner.setup()
                await web.TCPSite(runner, settings.health_host, settings.health_port).start()
            poll_s = settings.stranded_poll_s
            log.info("downloader started", extra={"fields": {"geometry": str(worker.geometry)}})
            async with (
                beating(redis_client, settings.prefix, Stage.DOWNLOAD),
                sweeping(worker.js, worker.store, Stage.DOWNLOAD, settings.prefix, poll_s),
            ):
                await worker.run()
            log.info("downloader stopped cleanly")
    finally:
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(Exception):  # a dead server: nothing left to drain
            await asyncio.wait_for(nc.drain(), 10)
        await close_nats(nc)
        with contextlib.suppress(Exception):
            await redis_client.aclose()
        pool.shutdown(wait=False, cancel_futures=True)
        bulk_pool.shutdown(wait=False, cancel_futures=True)


def main() -> None:
    settings = load_settings(DownloaderSettings)
    try:
        settings.geometry()  # a missing or bad manifest stops start-up with one line
    except (OSError, ValueError) as exc:
        print(f"DownloaderSettings: cannot read the model manifest: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    require_redis(settings.redis_url, "DownloaderSettings", settings.redis_startup_timeout_s)
    require_nats(settings.nats_servers, "DownloaderSettings", settings.nats_startup_timeout_s)
    telemetry.setup_logging("downloader", settings.log_level, settings.log_json)
    telemetry.setup_tracing("tagpipe-downloader")
    # Hostile and sloppy images make Pillow warn (corrupt EXIF, pixel counts
    # near its own bomb limit); our checks decide, the warnings are noise.
    warnings.filterwarnings("ignore", module=r"PIL\.")
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    eventloop.run(serve(settings))


if __name__ == "__main__":
    main()
