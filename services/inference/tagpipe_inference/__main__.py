"""`tagpipe-inference`: load the model, then serve the infer stream until SIGTERM.

Exit status: 0 after a clean SIGTERM (the batch in flight is finished and acked),
2 when the settings or the model directory are wrong, or the GPU is required and
absent (one clear line on stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from prometheus_client import start_http_server
from tagpipe_common import eventloop
from tagpipe_common.nats_io import close_nats, connect_nats, require_nats
from tagpipe_common.pulse import beating
from tagpipe_common.redis_io import connect_redis, require_redis
from tagpipe_common.results import ResultStore
from tagpipe_common.settings import load_settings
from tagpipe_common.stranded import sweeping
from tagpipe_common.subjects import Stage
from tagpipe_common.telemetry import setup_logging, setup_tracing

from tagpipe_inference.decoders import BatchDecoder, make_decoder
from tagpipe_inference.lanes import ModelThreads
from tagpipe_inference.model import Model, ModelLoadError, load_model
from tagpipe_inference.providers import GpuUnavailable
from tagpipe_inference.settings import InferenceSettings
from tagpipe_inference.worker import InferenceWorker

log = logging.getLogger("tagpipe_inference")


def load(settings: InferenceSettings, realtime: bool = False) -> Model:
    """The model as configured; the real-time lane's copy without a CPU arena (its
    batches are small: an arena warmed at the largest batch keeps ~300 MiB)."""
    model = load_model(
        settings.model_dir,
        providers=settings.provider_list,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        allow_spinning=settings.allow_spinning,
        gpu=settings.gpu_options,
        mem_pattern=settings.mem_pattern,
        runtime=settings.runtime,
        mem_arena=not realtime,
    )
    # Warm up at the largest batch: the first real one must not pay for allocations.
    model.warm_up(settings.max_batch)
    return model


async def serve(
    settings: InferenceSettings, model: Model, decoder: BatchDecoder, threads: ModelThreads
) -> None:
    nc = await connect_nats(settings.nats_servers, "tagpipe-inference", settings.nats_liveness())
    redis = connect_redis(settings.redis_url, settings.redis_timeouts())
    store = ResultStore.for_settings(redis, settings)
    worker = InferenceWorker(settings, model, nc.jetstream(), store, decoder, threads)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    runner = None
    if settings.health_port:
        from tagpipe_inference.health import start_health

        def ready() -> bool:
            up = nc.is_connected and worker.outage.healthy
            return model.ready and not worker.stopping and up

        runner = await start_health(settings.health_host, settings.health_port, ready)
    try:
        await worker.subscribe()
        log.info("consuming", extra={"fields": {"event": "started", "prefix": settings.prefix}})
        async with (
            beating(redis, settings.prefix, Stage.INFER),
            sweeping(worker.js, store, Stage.INFER, settings.prefix, settings.stranded_poll_s),
        ):
            await worker.run()
    finally:
        if runner is not None:
            await runner.cleanup()
        await close_nats(nc)  # flushes the last acks; never raises over a dead server
        with contextlib.suppress(Exception):
            await redis.aclose()
    log.info("stopped", extra={"fields": {"event": "stopped", "batches": worker.batches}})


def main() -> None:
    settings = load_settings(InferenceSettings)
    setup_logging("inference", settings.log_level, settings.log_json)
    setup_tracing("tagpipe-inference")
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    threads = ModelThreads(settings.bulk_decode_nice)
    try:
        # Lanes that share batches (mix_lanes) share one model too.
        model = threads.load(lambda rt: load(settings, rt), apart=not settings.mix_lanes)
        decoder = make_decoder(
            settings.decode,
            model.manifest.preprocess.resize,
            model.manifest.preprocess.crop,
            device_id=settings.device_id,
            max_batch=settings.max_batch,
            require_gpu=settings.require_gpu,
            gpu_decoder=settings.gpu_decoder,
        )
    except ModelLoadError as exc:
        print(f"tagpipe-inference: cannot serve model: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except GpuUnavailable as exc:
        print(f"tagpipe-inference: no GPU: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # The remote checks come after the local ones: a bad model directory or a missing
    # GPU is named as such even while NATS or Redis is away.
    require_redis(settings.redis_url, "InferenceSettings", settings.redis_startup_timeout_s)
    require_nats(settings.nats_servers, "InferenceSettings", settings.nats_startup_timeout_s)
    eventloop.run(serve(settings, model, decoder, threads))


if __name__ == "__main__":
    main()
