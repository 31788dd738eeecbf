"""The inference worker against real NATS JetStream, real Redis and the real model.

One loaded model is shared by the in-process tests (module scope); the crash and
shutdown tests run the real `python -m tagpipe_inference` in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from nats.js.client import JetStreamContext
from PIL import Image
from redis.asyncio import Redis
from skimage import data
from tagpipe_cli.servers import ServerProcess, free_port
from tagpipe_common import keys as K
from tagpipe_common.keys import RedisKeys
from tagpipe_common.manifest import ModelManifest
from tagpipe_common.messages import InferenceTask, TagResult
from tagpipe_common.results import ResultStore
from tagpipe_common.streams import StreamPolicy, consumer_backlog, delete_streams, ensure_streams
from tagpipe_common.subjects import HDR_MSG_ID, Lane, Stage, stage_names
from tagpipe_downloader.decode import Geometry
from tagpipe_downloader.forward import decode_for_gpu
from tagpipe_inference.decoders import PillowDecoder
from tagpipe_inference.model import Model, load_model
from tagpipe_inference.settings import InferenceSettings
from tagpipe_inference.worker import InferenceWorker

pytestmark = pytest.mark.integration
INFER = stage_names(Stage.INFER)
KEYS = RedisKeys()


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Model:
    m = load_model(model_dir, intra_op_threads=2)
    m.warm_up(4)
    return m


def crop(image: npt.NDArray[np.uint8], manifest: ModelManifest) -> npt.NDArray[np.uint8]:
    """What the downloader does: bicubic resize of the shorter side, centre crop."""
    pre = manifest.preprocess
    im = Image.fromarray(image).convert("RGB")
    scale = pre.resize / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
    left, top = (im.width - pre.crop) // 2, (im.height - pre.crop) // 2
    return np.asarray(im.crop((left, top, left + pre.crop, top + pre.crop)), dtype=np.uint8)


def make_task(item_id: str, pixels: npt.NDArray[np.uint8], lane: Lane = Lane.BULK) -> InferenceTask:
    owner = {"job_id": "job-1"} if lane is Lane.BULK else {"request_id": f"req-{item_id}"}
    return InferenceTask(
        item_id=item_id, lane=lane, shape=pixels.shape, pixels=pixels.tobytes(), **owner
    )


async def publish(js: JetStreamContext, task: InferenceTask, wire: bytes | None = None) -> None:
    data = task.to_wire() if wire is None else wire
    await js.publish(INFER.subject(task.lane), data, headers={HDR_MSG_ID: task.item_id})


def noise(seed: int, size: int = 224) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def settings_for(
    nats_proc: ServerProcess, redis_proc: ServerProcess, model_dir: Path, **kw: object
) -> InferenceSettings:
    base: dict[str, object] = {
        "nats_url": nats_proc.url,
        "redis_url": redis_proc.url,
        "model_dir": model_dir,
        "max_batch": 4,
        "max_wait_ms": 20.0,
        "max_deliver": 3,
        "health_port": 0,
        "intra_op_threads": 2,
    }
    return InferenceSettings(**{**base, **kw})  # type: ignore[arg-type]


async def wait_until(cond: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def backlog(js: JetStreamContext) -> int:
    return sum([await consumer_backlog(js, Stage.INFER, lane, "tagpipe") for lane in Lane])


@contextlib.asynccontextmanager
async def running(worker: InferenceWorker) -> AsyncIterator[InferenceWorker]:
    await worker.subscribe()
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def results_for(store: ResultStore, ids: list[str]) -> list[TagResult]:
    async def all_there() -> bool:
        return all(r is not None for r in await store.get_many(ids))

    await wait_until(all_there)
    return [r for r in await store.get_many(ids) if r is not None]


@pytest.fixture
def make_worker(
    js: JetStreamContext,
    store: ResultStore,
    model: Model,
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    model_dir: Path,
) -> Callable[..., InferenceWorker]:
    def make(**kw: object) -> InferenceWorker:
        return InferenceWorker(
            settings_for(nats_proc, redis_proc, model_dir, **kw), model, js, store
        )

    return make


async def test_photos_are_tagged_from_jetstream_to_redis(
    js: JetStreamContext,
    store: ResultStore,
    model: Model,
    make_worker: Callable[..., InferenceWorker],
) -> None:
    cat = make_task("chelsea", crop(data.chelsea(), model.manifest), Lane.REALTIME)  # type: ignore[no-untyped-call]
    cup = make_task("coffee", crop(data.coffee(), model.manifest))  # type: ignore[no-untyped-call]
    for t in (cat, cup):
        await publish(js, t)
    async with running(make_worker()):
        by_id = {r.item_id: r for r in await results_for(store, ["chelsea", "coffee"])}
    cat_r, cup_r = by_id["chelsea"], by_id["coffee"]
    assert cat_r.status == cup_r.status == "ok"
    assert cat_r.request_id == "req-chelsea" and cup_r.job_id == "job-1"
    assert len(cat_r.tags) == 5 and cat_r.model == "efficientnet-lite0"
    # ImageNet's domestic cat classes are ids 281..285 (tabby, tiger, Persian, Siamese, Mau).
    assert any(281 <= (t.class_id or 0) <= 285 for t in cat_r.tags), cat_r.tags
    assert any("espresso" in t.label or "cup" in t.label for t in cup_r.tags), cup_r.tags
    assert cat_r.timings.inference_ms is not None and cat_r.timings.inference_ms > 0
    assert cat_r.timings.infer_queue_ms is not None
    assert await backlog(js) == 0


async def test_waiting_items_fill_batches_lane_by_lane(
    js: JetStreamContext, store: ResultStore, make_worker: Callable[..., InferenceWorker]
) -> None:
    """Queued items fill whole batches, and a batch holds one lane's items: 5 bulk and
    3 real-time make 2 + 1 batches of at most 4 (mixed, they would make 2). That the
    real-time ones never wait for bulk batches is the blocked-bulk-thread test below."""
    bulk = [make_task(f"b{i}", noise(i)) for i in range(5)]
    rt = [make_task(f"r{i}", noise(100 + i), Lane.REALTIME) for i in range(3)]
    for t in bulk + rt:  # bulk queued first
        await publish(js, t)
    # Generous windows: on a starved CI box a fetch's short wait can expire before its
    # reply is read, which would blur the batch boundaries this test counts.
    windows = {"lane_peek_ms": 250, "max_wait_ms": 500, "top_up_ms": 250}
    async with running(make_worker(max_batch=4, **windows)) as w:
        await results_for(store, [t.item_id for t in bulk + rt])
        await wait_until(lambda: _zero(backlog(js)))
    assert (w.batches, w.items) == (3, 8)


async def test_a_realtime_item_does_not_wait_for_the_batch_window(
    js: JetStreamContext, store: ResultStore, make_worker: Callable[..., InferenceWorker]
) -> None:
    window_ms = 10_000.0  # the longest the settings allow; a held batch would wait it out
    async with running(make_worker(max_batch=8, max_wait_ms=window_ms)):
        await publish(js, make_task("rt", noise(7), Lane.REALTIME))
        (result,) = await results_for(store, ["rt"])
    assert result.status == "ok"
    # Enqueue to the batch's start: a batch held for more would have waited the window.
    assert result.timings.infer_queue_ms is not None
    assert result.timings.infer_queue_ms < window_ms


@pytest.mark.parametrize(("mix_lanes", "batches"), [(False, 2), (True, 1)])
async def test_a_realtime_batch_takes_bulk_items_along_only_when_lanes_mix(
    js: JetStreamContext,
    store: ResultStore,
    make_worker: Callable[..., InferenceWorker],
    mix_lanes: bool,
    batches: int,
) -> None:
    tasks = [make_task(f"m{i}", noise(40 + i)) for i in range(3)]
    tasks.append(make_task("m-rt", noise(50), Lane.REALTIME))
    for t in tasks:
        await publish(js, t)
    # Generous windows, so a starved box's slow reply cannot split the batches.
    w = make_worker(max_batch=8, lane_peek_ms=250, top_up_ms=250, mix_lanes=mix_lanes)
    async with running(w):
        results = await results_for(store, [t.item_id for t in tasks])
    assert {r.status for r in results} == {"ok"}
    assert (w.batches, w.items) == (batches, 4)


async def test_items_arriving_while_the_model_is_busy_join_one_batch(
    js: JetStreamContext, store: ResultStore, make_worker: Callable[..., InferenceWorker]
) -> None:
    """A real-time batch is closed when the model can take it, not when its first item
    came: items that arrive while the model runs ride along instead of queueing as
    batches of one."""
    gate = threading.Event()
    w = make_worker(max_batch=8, top_up_ms=250)  # a starved box's reply may take long
    w._threads.realtime.pool.submit(gate.wait)  # real-time's model thread: busy until the gate
    try:
        async with running(w):
            await publish(js, make_task("r0", noise(20), Lane.REALTIME))  # batch 1: waits
            await asyncio.sleep(0.3)
            await publish(js, make_task("r1", noise(21), Lane.REALTIME))  # batch 2 opens
            await asyncio.sleep(0.3)
            for i in range(2, 6):  # ...and these arrive while the model is still busy
                await publish(js, make_task(f"r{i}", noise(20 + i), Lane.REALTIME))
            await asyncio.sleep(0.3)
            gate.set()
            results = await results_for(store, [f"r{i}" for i in range(6)])
    finally:
        gate.set()
    assert {r.status for r in results} == {"ok"}
    assert (w.batches, w.items) == (2, 6)  # r0, then r1-r5 together


async def test_a_realtime_item_is_answered_while_bulk_batches_hold_the_model(
    js: JetStreamContext, store: ResultStore, make_worker: Callable[..., InferenceWorker]
) -> None:
    """Real-time batches have their own model thread and slot (lanes.py): with the bulk
    model thread blocked and every general slot holding a full bulk batch, a real-time
    item is still fetched, run and stored. With one model thread and no reserve it
    waited for both bulk batches."""
    gate = threading.Event()
    w = make_worker(max_batch=2, pipeline_depth=2)
    w._threads.bulk.pool.submit(gate.wait)  # the bulk model thread is busy until the gate
    bulk = [make_task(f"b{i}", noise(60 + i)) for i in range(6)]
    try:
        for t in bulk:
            await publish(js, t)
        async with running(w):

            async def slots_full() -> bool:  # two full bulk batches wait for the model
                return w._slots.general.locked()

            await wait_until(slots_full)
            await publish(js, make_task("rt", noise(70), Lane.REALTIME))
            (answer,) = await results_for(store, ["rt"])
            assert answer.status == "ok"
            assert [r for r in await store.get_many([t.item_id for t in bulk]) if r] == []
            gate.set()
            assert len(await results_for(store, [t.item_id for t in bulk])) == 6
    finally:
        gate.set()


async def _zero(n: Awaitable[int]) -> bool:
    return await n == 0


async def test_a_poison_message_gets_an_error_and_does_not_block(
    js: JetStreamContext,
    store: ResultStore,
    redis: Redis,
    make_worker: Callable[..., InferenceWorker],
) -> None:
    await redis.hset(KEYS.job("job-1"), mapping={K.JOB_TOTAL: 4, K.JOB_STATE: "running"})
    first, last = make_task("ok-1", noise(1)), make_task("ok-2", noise(2))
    short = make_task("short", noise(3))
    wrong = make_task("wrong-size", noise(4, size=200))
    await publish(js, first)
    await publish(js, short, wire=short.to_wire()[:-10])  # pixels cut short
    await publish(js, make_task("garbage", noise(5)), wire=b"\x00garbage, not a frame")
    await publish(js, wrong)
    await publish(js, last)
    async with running(make_worker(max_batch=2)):
        results = await results_for(store, ["ok-1", "short", "wrong-size", "ok-2"])
        await wait_until(lambda: _zero(backlog(js)))
    by_id = {r.item_id: r for r in results}
    assert by_id["ok-1"].status == by_id["ok-2"].status == "ok"
    for bad in ("short", "wrong-size"):
        assert (by_id[bad].status, by_id[bad].code) == ("error", "bad_tensor")
    job = await redis.hgetall(KEYS.job("job-1"))
    assert job[b"done"] == b"2" and job[b"failed"] == b"2"
    assert job[b"state"] == b"completed"
    assert await store.get("garbage") is None  # no owner to report to: dropped (term), logged


def worker_env(
    nats_proc: ServerProcess, redis_proc: ServerProcess, model_dir: Path, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGPIPE_")}
    env.update(
        TAGPIPE_NATS_URL=nats_proc.url,
        TAGPIPE_REDIS_URL=redis_proc.url,
        TAGPIPE_MODEL_DIR=str(model_dir.resolve()),
        TAGPIPE_MAX_BATCH="4",
        TAGPIPE_MAX_DELIVER="3",
        TAGPIPE_HEALTH_PORT="0",
        TAGPIPE_INTRA_OP_THREADS="1",
    )
    return {**env, **extra}


async def test_a_crash_between_store_and_ack_yields_exactly_one_result(
    js: JetStreamContext,
    store: ResultStore,
    redis: Redis,
    policy: StreamPolicy,
    make_worker: Callable[..., InferenceWorker],
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    model_dir: Path,
) -> None:
    await redis.hset(KEYS.job("job-1"), mapping={K.JOB_TOTAL: 1, K.JOB_STATE: "running"})
    await publish(js, make_task("once", noise(7)))
    env = worker_env(nats_proc, redis_proc, model_dir, TAGPIPE_CRASH_BEFORE_ACK="1")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tagpipe_inference", env=env)
    assert await asyncio.wait_for(proc.wait(), 60) == 3  # the test hook's os._exit
    assert (await store.get("once")) is not None
    info = await js.consumer_info(INFER.stream, INFER.consumer(Lane.BULK))
    assert info.num_ack_pending == 1  # stored but never acked: JetStream will redeliver
    async with running(make_worker()) as w:
        await wait_until(lambda: _zero(backlog(js)), timeout_s=policy.ack_wait_s + 20)
    assert w.duplicates == 1 and w.items == 1
    job = await redis.hgetall(KEYS.job("job-1"))
    assert job[b"done"] == b"1"  # counted once
    assert await redis.xlen(KEYS.job_results("job-1")) == 1


async def test_sigterm_finishes_the_batch_in_flight_and_exits_0(
    js: JetStreamContext,
    store: ResultStore,
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    model_dir: Path,
) -> None:
    port = free_port()
    env = worker_env(nats_proc, redis_proc, model_dir, TAGPIPE_HEALTH_PORT=str(port))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tagpipe_inference", env=env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def ready() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get("/readyz")).status_code == 200
                return False

            await wait_until(ready, timeout_s=60)
            assert (await http.get("/healthz")).status_code == 200
        ids = [f"t{i}" for i in range(40)]
        for i, item_id in enumerate(ids):
            await publish(js, make_task(item_id, noise(i)))

        async def some_done() -> bool:
            return any(r is not None for r in await store.get_many(ids))

        await wait_until(some_done)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stored = sum(r is not None for r in await store.get_many(ids))
    # Every item is either stored-and-acked or still owned by JetStream, never both/neither.
    assert stored >= 1
    assert stored + await backlog(js) == len(ids)


async def test_redis_down_holds_the_batch_until_it_can_be_stored(
    js: JetStreamContext,
    store: ResultStore,
    redis: Redis,
    redis_proc: ServerProcess,
    policy: StreamPolicy,
    make_worker: Callable[..., InferenceWorker],
) -> None:
    redis_proc.stop()
    await publish(js, make_task("held", noise(9)))
    worker = make_worker(ack_wait_s=policy.ack_wait_s, store_backoff_max_s=0.2)
    async with running(worker):

        async def inferred() -> bool:
            return worker.batches == 1

        await wait_until(inferred)
        # Longer than ack_wait: without lease extension JetStream would redeliver by now.
        await asyncio.sleep(policy.ack_wait_s * 1.5)
        redis_proc.start()
        await results_for(store, ["held"])
        await wait_until(lambda: _zero(backlog(js)))
    info = await js.consumer_info(INFER.stream, INFER.consumer(Lane.BULK))
    assert info.num_redelivered == 0  # one delivery: no attempt was burnt while Redis was away
    assert worker.items == 1 and worker.duplicates == 0
    assert await redis.xlen(KEYS.job_results("job-1")) == 1


class FailingModel(Model):
    """The real model whose session call fails, as a broken GPU or OOM would."""

    def run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        raise RuntimeError("onnxruntime: simulated device failure")


async def test_inference_failures_retry_then_end_as_an_error_result(
    js: JetStreamContext,
    store: ResultStore,
    redis: Redis,
    model: Model,
    policy: StreamPolicy,
    nats_proc: ServerProcess,
    redis_proc: ServerProcess,
    model_dir: Path,
) -> None:
    await redis.hset(KEYS.job("job-1"), mapping={K.JOB_TOTAL: 1, K.JOB_STATE: "running"})
    await publish(js, make_task("doomed", noise(11)))
    broken = FailingModel(model.manifest, model.labels, model.session, model.providers)
    settings = settings_for(nats_proc, redis_proc, model_dir, nak_delay_s=0.05)
    async with running(InferenceWorker(settings, broken, js, store)):
        [result] = await results_for(store, ["doomed"])
        await wait_until(lambda: _zero(backlog(js)))
    assert (result.status, result.code) == ("error", "inference_error")
    info = await js.consumer_info(INFER.stream, INFER.consumer(Lane.BULK))
    assert info.delivered.consumer_seq == policy.max_deliver  # retried until the last delivery
    job = await redis.hgetall(KEYS.job("job-1"))
    assert job[b"failed"] == b"1" and job[b"state"] == b"completed"


async def test_a_jetstream_outage_is_waited_out_not_fatal(
    js: JetStreamContext,
    store: ResultStore,
    policy: StreamPolicy,
    make_worker: Callable[..., InferenceWorker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With its streams gone JetStream answers every pull "service unavailable" (503),
    as it does for a moment after a restart: the worker keeps running, reports the
    outage once, and carries on when the streams are back (`running` re-raises
    whatever ended `run()`, so a worker that died fails the test there too)."""
    caplog.set_level(logging.INFO, logger="tagpipe_inference.worker")
    async with running(make_worker()) as w:
        await delete_streams(js, policy.prefix)
        await wait_until(lambda: _true(w.outage.attempts >= 5))  # several failed pulls
        assert not w.outage.healthy
        await ensure_streams(js, policy)
        task = make_task("after-outage", noise(21))
        await publish(js, task)
        [result] = await results_for(store, [task.item_id])
        await wait_until(lambda: _true(w.outage.healthy))
    assert result.status == "ok"
    assert w.outage.episodes == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(",")[0] for r in warnings] == ["jetstream unavailable"]
    assert any("available again" in r.getMessage() for r in caplog.records)


async def _true(value: bool) -> bool:
    return value


async def test_an_item_past_its_deadline_is_skipped_once_without_model_time(
    js: JetStreamContext, store: ResultStore, make_worker: Callable[..., InferenceWorker]
) -> None:
    late = make_task("late", noise(31), Lane.REALTIME)
    late.deadline = time.time() - 1.0  # its caller gave up while it queued
    live = make_task("live", noise(32), Lane.REALTIME)
    live.deadline = time.time() + 600
    for t in (late, live):
        await publish(js, t)
    async with running(make_worker()) as w:
        by_id = {r.item_id: r for r in await results_for(store, ["late", "live"])}
        await wait_until(lambda: _zero(backlog(js)))
        # A redelivery's twin (no Msg-Id, so JetStream keeps it): still one result.
        await js.publish(INFER.subject(late.lane), late.to_wire())
        await wait_until(lambda: _zero(backlog(js)))
    assert (by_id["late"].status, by_id["late"].code) == ("error", "deadline_exceeded")
    assert by_id["live"].status == "ok"
    assert w.items == 1  # only the live item reached the model
    assert w.duplicates == 1


class CountingDecoder(PillowDecoder):
    """The CPU stand-in for the GPU decoder: same interface, counts its batches."""

    name = "gpu"

    def __init__(self, resize: int, crop: int) -> None:
        super().__init__(resize, crop)
        self.batches: list[int] = []

    def decode(self, payloads: Sequence[bytes], crops: Sequence[bool]) -> npt.NDArray[np.uint8]:
        self.batches.append(len(payloads))
        return super().decode(payloads, crops)


def jpeg_bytes(image: npt.NDArray[np.uint8], quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def compressed(
    item_id: str, payload: bytes, shape: tuple[int, int, int], enc: str
) -> InferenceTask:
    return InferenceTask(
        item_id=item_id,
        job_id="job-1",
        lane=Lane.BULK,
        shape=shape,
        encoding=enc,  # type: ignore[arg-type]
        media_type="image/jpeg",
        pixels=payload,
    )


async def test_compressed_frames_are_decoded_in_batches_and_a_corrupt_one_fails_alone(
    js: JetStreamContext,
    store: ResultStore,
    model: Model,
    make_worker: Callable[..., InferenceWorker],
) -> None:
    pre = model.manifest.preprocess
    cat = data.chelsea()  # type: ignore[no-untyped-call]
    big = np.asarray(Image.fromarray(cat).resize((cat.shape[1] * 4, cat.shape[0] * 4)))
    fwd = decode_for_gpu(jpeg_bytes(big), Geometry(pre.resize, pre.crop), 50_000_000)
    assert fwd.original is not None and fwd.original_shape is not None
    tasks = [
        compressed("original", fwd.original, fwd.original_shape, "original"),
        compressed("crop", jpeg_bytes(crop(cat, model.manifest)), (224, 224, 3), "encoded_crop"),
        compressed("corrupt", b"\xff\xd8\xff\xe0 cut short", (300, 451, 3), "original"),
        make_task("raw", crop(cat, model.manifest)),
    ]
    for t in tasks:
        await publish(js, t)
    worker = make_worker(max_batch=4, max_wait_ms=500)
    decoder = CountingDecoder(pre.resize, pre.crop)
    worker.decoder = decoder
    async with running(worker):
        by_id = {r.item_id: r for r in await results_for(store, [t.item_id for t in tasks])}
        await wait_until(lambda: _zero(backlog(js)))
    for name in ("original", "crop", "raw"):
        assert by_id[name].status == "ok", by_id[name]
        assert any(281 <= (t.class_id or 0) <= 285 for t in by_id[name].tags), by_id[name].tags
    assert (by_id["corrupt"].status, by_id["corrupt"].code) == ("error", "decode_error")
    assert sum(decoder.batches) >= 3  # every compressed item went through the decoder
    assert max(decoder.batches) >= 2  # in batches, not one call per item
