"""The download worker end to end: real NATS JetStream, real Redis, a real local
aiohttp image server. Every case ends in an error result with the right code or
in a correct tensor on the inference stream.

The image server listens on 127.0.0.2 and only 127.0.0.2/32 is allowlisted, so
127.0.0.1 (and everything else private) stays blocked, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import nats.js.errors
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from PIL import Image
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from tagpipe_cli.servers import ServerProcess, free_port
from tagpipe_common.keys import JOB_STATE, JOB_TOTAL, RedisKeys
from tagpipe_common.messages import DownloadTask, InferenceTask, TagResult
from tagpipe_common.nats_io import connect_nats
from tagpipe_common.results import ResultStore
from tagpipe_common.streams import StreamPolicy, delete_streams, ensure_streams
from tagpipe_common.subjects import LANES, Lane, Stage, stage_names
from tagpipe_downloader.__main__ import health_app
from tagpipe_downloader.decode import Geometry, decode_image
from tagpipe_downloader.fetch import Fetcher
from tagpipe_downloader.settings import DownloaderSettings
from tagpipe_downloader.worker import DownloadWorker

from bench.imageserver import ImageServer, bomb_png, exif_rotated_jpeg, make_jpeg
from tests.tools import eventually

pytestmark = pytest.mark.integration

DOWNLOAD = stage_names(Stage.DOWNLOAD)
INFER = stage_names(Stage.INFER)


@dataclass
class Harness:
    js: JetStreamContext
    store: ResultStore
    redis: Redis
    images: ImageServer
    worker: DownloadWorker
    infer_subs: dict[Lane, Any]
    tensors: dict[str, InferenceTask] = field(default_factory=dict)
    resume: Callable[[], None] = lambda: None  # starts a worker created with paused=True

    async def submit(self, url: str | None = None, *, lane: Lane = Lane.REALTIME, **kw: Any) -> str:
        item_id = uuid.uuid4().hex
        owner = {"job_id": kw.pop("job_id")} if "job_id" in kw else {"request_id": "r1"}
        task = DownloadTask(item_id=item_id, url=url, lane=lane, **owner, **kw)
        await self.js.publish(DOWNLOAD.subject(lane), task.to_json())
        return item_id

    async def outcome(self, item_id: str, timeout_s: float = 15.0) -> InferenceTask | TagResult:
        async with asyncio.timeout(timeout_s):
            while True:
                if item_id in self.tensors:
                    return self.tensors[item_id]
                result = await self.store.get(item_id)
                if result is not None:
                    return result
                for sub in self.infer_subs.values():
                    try:
                        msgs = await sub.fetch(10, timeout=0.05)
                    except TimeoutError:
                        continue
                    for m in msgs:
                        t = InferenceTask.from_wire(m.data)
                        self.tensors[t.item_id] = t
                        await m.ack()

    async def code(self, url: str, **kw: Any) -> str | None:
        out = await self.outcome(await self.submit(url, **kw))
        assert isinstance(out, TagResult), f"expected an error result, got a tensor for {url}"
        assert out.status == "error"
        return out.code

    async def tensor(self, url: str | None, **kw: Any) -> np.ndarray:
        out = await self.outcome(await self.submit(url, **kw))
        assert isinstance(out, InferenceTask), f"expected a tensor, got {out}"
        assert out.shape == (224, 224, 3) and len(out.pixels) == out.expected_nbytes()
        return np.frombuffer(out.pixels, np.uint8).reshape(out.shape)


Start = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext, redis: Redis
) -> AsyncIterator[Start]:
    stack: list[tuple[DownloadWorker, asyncio.Future[None], Client, Any, ImageServer, Redis]] = []

    async def _start(paused: bool = False, **overrides: Any) -> Harness:
        cfg: dict[str, Any] = {
            "nats_url": nats_proc.url,
            "redis_url": redis_proc.url,
            "allow_cidrs": "127.0.0.2/32",
            "max_deliver": 3,  # as the `policy` fixture
            "connect_timeout_s": 1.0,
            "read_timeout_s": 1.0,
            "total_timeout_s": 1.0,
            "fetch_retries": 1,
            "max_bytes": 2 * 1024 * 1024,
            "transient_nak_delay_s": 0.1,
            "progress_interval_s": 0.5,
            "decode_workers": 2,
            "health_port": 0,
        }
        settings = DownloaderSettings(**(cfg | overrides))
        images = await ImageServer(host="127.0.0.2").__aenter__()
        nc = await connect_nats(settings.nats_servers, "downloader-under-test")
        wredis = Redis.from_url(settings.redis_url)
        fetcher = await Fetcher(settings.fetch_config()).__aenter__()
        worker = DownloadWorker(settings, nc, wredis, fetcher, ThreadPoolExecutor(2))
        run = asyncio.get_running_loop().create_future()
        if not paused:
            run = asyncio.create_task(worker.run())
        stack.append((worker, run, nc, fetcher, images, wredis))
        subs = {
            lane: await js.pull_subscribe_bind(durable=INFER.consumer(lane), stream=INFER.stream)
            for lane in LANES
        }
        store = ResultStore(redis, RedisKeys(), ttl_s=600)
        harness = Harness(js, store, redis, images, worker, subs)
        if paused:

            def resume() -> None:
                task = asyncio.create_task(worker.run())
                idx = next(i for i, entry in enumerate(stack) if entry[0] is worker)
                stack[idx] = (worker, task, nc, fetcher, images, wredis)

            harness.resume = resume
        return harness

    yield _start
    for worker, run, nc, fetcher, images, wredis in stack:
        worker.stop()
        if isinstance(run, asyncio.Task):
            await asyncio.wait_for(run, 10)
        await fetcher.__aexit__(None, None, None)
        await nc.close()
        await wredis.aclose()
        await images.__aexit__(None, None, None)
        worker.pool.shutdown(wait=False)


@pytest.fixture
async def h(start: Start) -> Harness:
    return await start()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def mean_rgb(px: np.ndarray) -> np.ndarray:
    return px.reshape(-1, 3).mean(axis=0)


async def test_jpeg_with_wrong_content_type_is_accepted(h: Harness) -> None:
    data = make_jpeg(640, 480, seed=1)
    url = h.images.add("photo", data, content_type="text/plain")
    px = await h.tensor(url)
    assert np.array_equal(px, decode_image(data, Geometry(), 50_000_000).pixels)
    task = h.tensors[next(iter(h.tensors))]
    assert task.timings.download_ms is not None and task.timings.decode_ms is not None
    assert task.timings.download_queue_ms is not None and task.source == url


async def test_slow_server_times_out_on_the_final_delivery(start: Start) -> None:
    h = await start(fetch_retries=0)
    h.images.add("x", make_jpeg(64, 64))
    assert await h.code(h.images.url("/slow?delay_s=3&name=x")) == "download_timeout"
    assert len(h.images.hits["/slow"]) == 3  # one per delivery (max_deliver=3), then a result


async def test_endless_body_is_too_large(h: Harness) -> None:
    assert await h.code(h.images.url("/endless")) == "too_large"


async def test_html_served_as_jpeg_is_refused(h: Harness) -> None:
    url = h.images.add("page", b"<!doctype html><html><body>gone</body></html>", "image/jpeg")
    assert await h.code(url) == "not_an_image"


async def test_redirect_to_loopback_is_blocked(h: Harness) -> None:
    h.images.add("x", make_jpeg(64, 64))
    target = f"http://127.0.0.1:{h.images.port}/img/x"
    assert await h.code(h.images.url(f"/redirect?to={target}")) == "blocked_address"


async def test_redirect_to_metadata_ip_is_blocked(h: Harness) -> None:
    url = h.images.url("/redirect?to=http://169.254.169.254/latest/meta-data/")
    assert await h.code(url) == "blocked_address"


async def test_redirect_loop(h: Harness) -> None:
    assert await h.code(h.images.url("/loop/a")) == "redirect_loop"


async def test_truncated_jpeg(h: Harness) -> None:
    data = make_jpeg(640, 480)
    assert await h.code(h.images.add("cut", data[: len(data) // 2])) == "decode_error"


async def test_png_with_alpha_is_composited_on_white(h: Harness) -> None:
    img = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    img.paste((200, 0, 0, 255), (0, 0, 300, 150))
    px = await h.tensor(h.images.add("alpha", png(img), "image/png"))
    assert np.allclose(mean_rgb(px[:90]), (200, 0, 0), atol=3)
    assert np.allclose(mean_rgb(px[-90:]), (255, 255, 255), atol=3)


async def test_exif_rotated_jpeg_comes_out_upright(h: Harness) -> None:
    px = await h.tensor(h.images.add("rot", exif_rotated_jpeg(1200, 600, orientation=6)))
    assert np.allclose(mean_rgb(px[:80]), (230, 20, 20), atol=12)  # red on top
    assert np.allclose(mean_rgb(px[-80:]), (20, 20, 230), atol=12)  # blue below


async def test_429_with_retry_after_is_honoured(h: Harness) -> None:
    h.images.add("ok", make_jpeg(320, 240))
    px = await h.tensor(h.images.url("/flaky/k429/1/429?retry_after=1&name=ok"))
    assert px.shape == (224, 224, 3)
    first, second = h.images.hits["/flaky/k429/1/429"]
    assert second - first >= 0.95  # waited as told, not the sub-second backoff


async def test_decompression_bomb(h: Harness) -> None:
    assert await h.code(h.images.add("bomb", bomb_png(20000, 20000), "image/png")) == (
        "image_too_many_pixels"
    )


async def test_404(h: Harness) -> None:
    labels = {"lane": "realtime", "outcome": "http_404"}
    before = REGISTRY.get_sample_value("tagpipe_downloader_items_total", labels) or 0.0
    assert await h.code(h.images.url("/status/404")) == "http_404"
    assert len(h.images.hits["/status/404"]) == 1  # 4xx is never retried
    assert REGISTRY.get_sample_value("tagpipe_downloader_items_total", labels) == before + 1


async def test_503_every_time_ends_as_an_error_result(start: Start) -> None:
    h = await start(fetch_retries=0)
    assert await h.code(h.images.url("/status/503")) == "http_503"
    assert len(h.images.hits["/status/503"]) == 3


async def test_uploaded_blob_is_decoded_and_deleted(h: Harness) -> None:
    data = png(Image.new("RGB", (50, 40), (0, 200, 0)))
    item_id = uuid.uuid4().hex
    key = RedisKeys().blob(item_id)
    await h.redis.set(key, data)
    task = DownloadTask(item_id=item_id, request_id="r", blob_key=key)
    await h.js.publish(DOWNLOAD.subject(Lane.REALTIME), task.to_json())
    out = await h.outcome(item_id)
    assert isinstance(out, InferenceTask) and out.source == f"upload:{item_id}"
    assert np.allclose(mean_rgb(np.frombuffer(out.pixels, np.uint8)), (0, 200, 0), atol=2)
    assert await h.redis.exists(key) == 0


async def test_missing_blob(h: Harness) -> None:
    item_id = uuid.uuid4().hex
    task = DownloadTask(item_id=item_id, request_id="r", blob_key=RedisKeys().blob(item_id))
    await h.js.publish(DOWNLOAD.subject(Lane.REALTIME), task.to_json())
    out = await h.outcome(item_id)
    assert isinstance(out, TagResult) and out.code == "blob_missing"


async def test_cancelled_job_items_are_dropped_without_a_result(h: Harness) -> None:
    await h.redis.hset(RedisKeys().job("j1"), mapping={JOB_STATE: "cancelled", JOB_TOTAL: 1})
    url = h.images.add("x", make_jpeg(64, 64))
    dropped = await h.submit(url, job_id="j1", lane=Lane.BULK)
    await h.tensor(url, job_id="j2", lane=Lane.BULK)  # the worker goes on with other jobs

    async def consumed() -> bool:
        info = await h.js.consumer_info(DOWNLOAD.stream, DOWNLOAD.consumer(Lane.BULK))
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(consumed, within=30)
    assert await h.store.get(dropped) is None  # acked, and no per-item write
    assert len(h.images.hits["/img/x"]) == 1  # only j2's item was fetched
    assert await h.redis.hget(RedisKeys().job("j1"), "cancelled") is None


async def test_bulk_items_go_to_the_bulk_infer_lane(h: Harness) -> None:
    await h.redis.hset(RedisKeys().job("j2"), mapping={JOB_STATE: "running", JOB_TOTAL: 1})
    item_id = await h.submit(h.images.add("x", make_jpeg(300, 200)), job_id="j2", lane=Lane.BULK)
    out = await h.outcome(item_id)
    assert isinstance(out, InferenceTask) and out.lane == Lane.BULK and out.job_id == "j2"


async def test_stop_finishes_in_flight_items(h: Harness) -> None:
    h.images.add("x", make_jpeg(64, 64))
    item_id = await h.submit(h.images.url("/slow?delay_s=0.6&name=x"))
    async with asyncio.timeout(5):
        while not h.images.hits["/slow"]:  # noqa: ASYNC110 - polling a plain list
            await asyncio.sleep(0.02)
    h.worker.stop()  # what SIGTERM does
    out = await h.outcome(item_id)
    assert isinstance(out, InferenceTask)


async def test_health_endpoints_follow_the_connections(h: Harness) -> None:
    async with TestClient(TestServer(health_app(h.worker))) as client:
        assert (await client.get("/healthz")).status == 200
        async with asyncio.timeout(5):
            while (await client.get("/readyz")).status != 200:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await h.worker.nc.close()
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert "nats disconnected" in (await resp.json())["problems"]


async def test_process_exits_0_on_sigterm(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    env = os.environ | {
        "TAGPIPE_METRICS_PORT": str(metrics_port),
        "TAGPIPE_NATS_URL": nats_proc.url,
        "TAGPIPE_REDIS_URL": redis_proc.url,
        "TAGPIPE_HEALTH_HOST": "127.0.0.1",
        "TAGPIPE_HEALTH_PORT": str(port),
        "TAGPIPE_DECODE_WORKERS": "1",
    }
    exe = Path(sys.executable).parent / "tagpipe-downloader"
    log = tmp_path / "downloader.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(str(exe), env=env, stderr=out)
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(20):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                assert "tagpipe_downloader_inflight" in await resp.text()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0, log.read_text()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_slow_download_extends_its_lease(
    start: Start, js: JetStreamContext, policy: StreamPolicy
) -> None:
    # A 1 s ack_wait on the download consumers: without in_progress() JetStream
    # would redeliver this 2.5 s download twice while it is still running.
    short = replace(policy, ack_wait_overrides={Stage.DOWNLOAD: 1.0})
    await ensure_streams(js, short)
    h = await start(total_timeout_s=5.0, read_timeout_s=5.0, progress_interval_s=0.3)
    h.images.add("x", make_jpeg(64, 64))
    px = await h.tensor(h.images.url("/slow?delay_s=2.5&name=x"))
    assert px.shape == (224, 224, 3)
    assert len(h.images.hits["/slow"]) == 1


async def test_redis_outage_delays_the_result_but_loses_nothing(
    h: Harness, redis_proc: ServerProcess
) -> None:
    redis_proc.stop()
    item_id = await h.submit(h.images.url("/status/404"))
    async with asyncio.timeout(10):
        while not h.images.hits["/status/404"]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the worker is now retrying its result write
    redis_proc.restart()
    out = await h.outcome(item_id)
    assert isinstance(out, TagResult) and out.code == "http_404"


async def test_realtime_lane_is_served_before_the_bulk_backlog(start: Start) -> None:
    h = await start(paused=True, max_inflight=1, fetch_batch=1)
    await h.redis.hset(RedisKeys().job("j3"), mapping={JOB_STATE: "running", JOB_TOTAL: 5})
    h.images.add("x", make_jpeg(64, 64))
    bulk = [
        await h.submit(h.images.url(f"/img/x?b={i}"), job_id="j3", lane=Lane.BULK) for i in range(5)
    ]
    rt = await h.submit(h.images.url("/img/x?rt=1"))
    h.resume()
    await h.outcome(rt)
    for item_id in bulk:
        assert isinstance(await h.outcome(item_id), InferenceTask)
    order = [t.item_id for t in sorted(h.tensors.values(), key=lambda t: t.enqueued_at)]
    assert order[0] == rt, "the real-time item queued last must be processed first"


async def test_waits_for_missing_consumers_and_still_stops(
    nats_proc: ServerProcess, redis_proc: ServerProcess
) -> None:
    # No ensure_streams: the worker must wait for the operator, not invent consumers.
    settings = DownloaderSettings(nats_url=nats_proc.url, redis_url=redis_proc.url, health_port=0)
    nc = await connect_nats(settings.nats_servers, "downloader-unbound")
    wredis = Redis.from_url(settings.redis_url)
    try:
        async with Fetcher(settings.fetch_config()) as fetcher:
            worker = DownloadWorker(settings, nc, wredis, fetcher, ThreadPoolExecutor(1))
            run = asyncio.create_task(worker.run())
            await asyncio.sleep(0.8)
            assert not worker.bound and not run.done()
            with pytest.raises(nats.js.errors.NotFoundError):
                await nc.jetstream().stream_info(DOWNLOAD.stream)
            worker.stop()
            await asyncio.wait_for(run, 3)
    finally:
        await nc.close()
        await wredis.aclose()


async def test_transient_failure_recovers_on_a_later_delivery(start: Start) -> None:
    h = await start(fetch_retries=0)
    h.images.add("ok", make_jpeg(320, 240))
    # 503 on deliveries 1 and 2 (NAKed with a delay), the image on the final one.
    px = await h.tensor(h.images.url("/flaky/k2/2/503?name=ok"))
    assert px.shape == (224, 224, 3)
    assert len(h.images.hits["/flaky/k2/2/503"]) == 3


async def test_a_repeated_item_reaches_inference_once(h: Harness, js: JetStreamContext) -> None:
    url = h.images.add("x", make_jpeg(200, 200))
    task = DownloadTask(item_id="same-item", request_id="r", url=url)
    for _ in range(2):  # a redelivery after publish-but-before-ack looks exactly like this
        await js.publish(DOWNLOAD.subject(Lane.REALTIME), task.to_json())
    async with asyncio.timeout(10):
        while len(h.images.hits["/img/x"]) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert isinstance(await h.outcome("same-item"), InferenceTask)
    async with asyncio.timeout(10):  # both download messages acked: both publishes done
        while True:
            dl = await js.consumer_info(DOWNLOAD.stream, DOWNLOAD.consumer(Lane.REALTIME))
            if dl.num_pending == 0 and dl.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)
    info = await js.consumer_info(INFER.stream, INFER.consumer(Lane.REALTIME))
    assert info.num_pending == 0 and info.delivered.stream_seq == 1


async def test_a_jetstream_outage_is_waited_out_and_reported_not_ready(
    h: Harness, policy: StreamPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    """With its streams gone JetStream answers every pull "service unavailable", as
    for a moment after a restart: the worker stays up, /readyz names the outage, one
    WARNING for the episode; once the streams are back, work flows again."""
    caplog.set_level(logging.INFO, logger="tagpipe.downloader")
    async with TestClient(TestServer(health_app(h.worker))) as client:
        async with asyncio.timeout(10):
            while (await client.get("/readyz")).status != 200:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await delete_streams(h.js, policy.prefix)
        async with asyncio.timeout(30):
            while h.worker.nats_outage.attempts < 5:  # noqa: ASYNC110 - several failed pulls
                await asyncio.sleep(0.05)
        during = await client.get("/readyz")
        problems = (await during.json())["problems"]
        await ensure_streams(h.js, policy)
        pixels = await h.tensor(h.images.add("x", make_jpeg(64, 64)))
        async with asyncio.timeout(10):
            while (await client.get("/readyz")).status != 200:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    assert during.status == 503
    assert any(p.startswith("jetstream: ") for p in problems), problems
    assert pixels.shape == (224, 224, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w.split(",")[0] for w in warnings] == ["jetstream unavailable"], warnings


async def test_an_item_past_its_deadline_is_not_downloaded(h: Harness) -> None:
    url = h.images.add("late", make_jpeg(64, 64))
    late = await h.submit(url, deadline=time.time() - 1.0)
    out = await h.outcome(late)
    assert isinstance(out, TagResult)
    assert (out.status, out.code) == ("error", "deadline_exceeded")
    assert not h.images.hits["/img/late"]  # no connection spent on a departed caller
    live = await h.outcome(await h.submit(url, deadline=time.time() + 600))
    assert isinstance(live, InferenceTask) and live.deadline is not None  # travels on


async def test_decode_gpu_forwards_camera_jpegs_and_crops_the_rest(start: Start) -> None:
    h = await start(decode="gpu")
    small = make_jpeg(640, 480)
    out = await h.outcome(await h.submit(h.images.add("small", small)))
    assert isinstance(out, InferenceTask)
    assert (out.encoding, out.media_type, out.shape) == ("original", "image/jpeg", (480, 640, 3))
    assert out.pixels == small  # not decoded here at all
    big = await h.outcome(await h.submit(h.images.add("rot", exif_rotated_jpeg(2400, 1200, 6))))
    assert isinstance(big, InferenceTask) and big.encoding == "original"
    height, width, _ = big.shape
    assert height > width and 256 <= width <= 512  # shrunk by the draft, upright
    with Image.open(io.BytesIO(big.pixels)) as img:
        assert img.size == (width, height)
    crop = await h.tensor(h.images.add("png", png(Image.new("RGB", (300, 300))), "image/png"))
    assert crop.shape == (224, 224, 3)  # not a camera JPEG: the CPU path, as before
    # A cut-short small JPEG is only header-checked here: it goes on, and the
    # inference tier answers it with decode_error (test_inference_worker.py).
    cut = await h.outcome(await h.submit(h.images.add("cut", small[: len(small) // 2])))
    assert isinstance(cut, InferenceTask) and cut.encoding == "original"


async def test_a_compressed_hop_publishes_the_crop_as_an_encoded_crop(start: Start) -> None:
    h = await start(hop_encoding="webp-lossless")
    photo = make_jpeg(640, 480)
    out = await h.outcome(await h.submit(h.images.add("photo", photo)))
    assert isinstance(out, InferenceTask)
    assert (out.encoding, out.media_type) == ("encoded_crop", "image/webp")
    assert out.shape == (224, 224, 3) and len(out.pixels) < out.expected_nbytes()
    with Image.open(io.BytesIO(out.pixels)) as img:
        decoded = np.asarray(img.convert("RGB"))
    # Lossless: exactly the crop a raw frame would carry.
    assert np.array_equal(decoded, decode_image(photo, h.worker.geometry, 50_000_000).pixels)


async def test_an_original_hop_forwards_small_bulk_jpegs_and_crops_the_rest(start: Start) -> None:
    h = await start(hop_encoding="original")
    small = make_jpeg(640, 480)
    out = await h.outcome(await h.submit(h.images.add("small", small), lane=Lane.BULK))
    assert isinstance(out, InferenceTask)
    assert (out.encoding, out.media_type, out.shape) == ("original", "image/jpeg", (480, 640, 3))
    assert out.pixels == small  # the file as downloaded
    big = make_jpeg(1600, 1200)  # shorter side over twice the resize target: cropped here
    crop = await h.tensor(h.images.add("big", big), lane=Lane.BULK)
    assert np.array_equal(crop, decode_image(big, h.worker.geometry, 50_000_000).pixels)
    # A real-time item is decoded here whatever its size: it never waits for bulk decodes.
    rt = await h.tensor(h.images.add("rt", small), lane=Lane.REALTIME)
    assert np.array_equal(rt, decode_image(small, h.worker.geometry, 50_000_000).pixels)
