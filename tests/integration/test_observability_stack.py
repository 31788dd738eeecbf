"""Observability of the real local stack: traces, per-item log lines, /metrics.

NATS, Redis, gateway, downloader and inference run as separate processes (the
`tagpipe up` launcher) on the real model. Each process exports its spans over
OTLP/HTTP (protobuf) to a small collector running in this test, exactly as
they would to an OpenTelemetry Collector; the test then reads one image's
trace back across all three services. The metrics test scrapes every
component's /metrics before and after a known batch of traffic and compares
the deltas with what was sent and with the inference worker's own log lines.

One stack for the whole module keeps the wall time down.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import skimage.data
from PIL import Image
from tagpipe_cli.servers import free_port
from tagpipe_cli.stack import Stack, StackConfig
from tagpipe_common.messages import DownloadTask
from tagpipe_common.subjects import HDR_MSG_ID, Lane, Stage, stage_names

from bench.imageserver import ImageServer
from tests.integration.observability_kit import (
    WAIT_S,
    BackgroundLoop,
    Collector,
    Span,
    ancestors,
    delta,
    scrape,
    settle,
    total,
    trace_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICES = {"tagpipe-gateway", "tagpipe-downloader", "tagpipe-inference"}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "JPEG", quality=90)  # type: ignore[no-untyped-call]
    return buf.getvalue()


CAT_JPEG = _jpeg()


# --- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bg() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def collector(bg: BackgroundLoop) -> Iterator[Collector]:
    c = Collector()
    bg.run(c.start())
    yield c
    bg.run(c.stop())


@pytest.fixture(scope="module")
def images(bg: BackgroundLoop) -> Iterator[ImageServer]:
    srv = ImageServer(host="127.0.0.1")
    bg.run(srv.__aenter__())
    srv.add("chelsea.jpg", CAT_JPEG)
    yield srv
    bg.run(srv.__aexit__())


@dataclass
class Observed:
    stack: Stack
    metrics: dict[str, str]  # component -> /metrics URL

    def log_lines(self, service: str) -> list[dict[str, Any]]:
        out = []
        text = (self.stack.log_dir / f"{service}.log").read_text()
        # The last line may be half written: only whole lines are read.
        for line in text[: text.rfind("\n") + 1].splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


@pytest.fixture(scope="module")
def observed(
    tmp_path_factory: pytest.TempPathFactory, collector: Collector, model_dir: Path
) -> Iterator[Observed]:
    gw_port, dl_port, inf_port = free_port(), free_port(), free_port()
    config = StackConfig(
        data_dir=tmp_path_factory.mktemp("obs"),
        model_dir=model_dir,
        allow_cidrs="127.0.0.0/8",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans reach the collector promptly
        },
        downloader_env={"TAGPIPE_METRICS_PORT": str(dl_port)},
        inference_env={"TAGPIPE_METRICS_PORT": str(inf_port), "TAGPIPE_INTRA_OP_THREADS": "1"},
        gateway_env={
            "TAGPIPE_REALTIME_TIMEOUT_S": "60",
            "TAGPIPE_REALTIME_DEFAULT_TIMEOUT_S": "60",
            "TAGPIPE_METRICS_PORT": str(gw_port),
        },
    )
    with Stack(config) as stack:
        yield Observed(
            stack,
            {
                "gateway": f"http://127.0.0.1:{gw_port}/metrics",
                "gateway-api": stack.gateway_url + "/metrics",
                "downloader": f"http://127.0.0.1:{dl_port}/metrics",
                "inference": f"http://127.0.0.1:{inf_port}/metrics",
            },
        )


@pytest.fixture(scope="module")
def http(observed: Observed) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=observed.stack.gateway_url, timeout=90) as client:
        yield client


# --- helpers --------------------------------------------------------------------


def tag(http: httpx.Client, urls: list[str]) -> dict[str, Any]:
    r = http.post("/v1/tags", json={"urls": urls})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def wait_lines(
    observed: Observed, service: str, pred: Callable[[dict[str, Any]], bool], n: int = 1
) -> list[dict[str, Any]]:
    """The log lines matching `pred`, once there are `n` (the response may beat the log)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        lines = [line for line in observed.log_lines(service) if pred(line)]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


# --- traces -----------------------------------------------------------------------

ITEM_SPANS = {
    "tag_request",
    "publish",
    "download_queue_wait",
    "download",
    "dns_connect",
    "transfer",
    "decode",
    "preprocess",
    "infer_queue_wait",
    "inference",
    "result_write",
}


def test_one_image_is_one_trace_across_all_three_services(
    http: httpx.Client, observed: Observed, collector: Collector, images: ImageServer
) -> None:
    body = tag(http, [images.url("/img/chelsea.jpg?v=trace")])
    rid = body["request_id"]
    assert body["items"][0]["status"] == "ok"
    # Waits until every assertion on the spans holds (each process exports on its own).
    trace_id = collector.until(lambda spans: check_one_trace(spans, rid))

    # Exactly one per-item line with the stage timings, carrying the trace id.
    lines = wait_lines(
        observed,
        "inference-0",
        lambda ln: ln.get("event") == "item_timings" and ln.get("request_id") == rid,
    )
    assert len(lines) == 1
    (line,) = lines
    assert line["trace_id"] == trace_id and line["component"] == "inference"
    assert line["status"] == "ok" and line["item_id"] == body["items"][0]["item_id"]
    for key in ("download_queue_ms", "connect_ms", "download_ms", "decode_ms", "inference_ms"):
        assert line[key] >= 0, key
    assert line["end_to_end_ms"] >= line["inference_ms"] > 0


def check_one_trace(spans: list[Span], rid: str) -> str:
    """The trace id of request `rid`, once its trace is complete and well formed."""
    mine = trace_of(spans, rid)
    assert {s.name for s in mine} >= ITEM_SPANS, sorted({s.name for s in mine})
    assert {s.service for s in mine} == SERVICES
    trace_id = mine[0].trace_id

    # One tree: a single root (FastAPI's HTTP server span, the request), every
    # other span's parent inside the same trace.
    by_id = {s.span_id: s for s in mine}
    (root,) = [s for s in mine if not s.parent_id]
    assert (root.service, root.name) == ("tagpipe-gateway", "POST /v1/tags")
    assert all(s.parent_id in by_id for s in mine if s.parent_id)

    def one(service: str, name: str) -> Span:
        (span,) = [s for s in mine if s.service == service and s.name == name]
        return span

    gw_publish = [("tagpipe-gateway", "publish"), ("tagpipe-gateway", "tag_request")]
    dl = [("tagpipe-downloader", "download"), *gw_publish]
    dl_publish = [("tagpipe-downloader", "publish"), *dl]
    assert ancestors(one("tagpipe-downloader", "download_queue_wait"), by_id) == gw_publish
    for step in ("dns_connect", "transfer", "decode", "preprocess", "publish"):
        assert ancestors(one("tagpipe-downloader", step), by_id) == dl, step
    for step in ("infer_queue_wait", "inference", "result_write"):
        assert ancestors(one("tagpipe-inference", step), by_id) == dl_publish, step

    # The stages follow each other on the timeline (one host, one clock).
    order = [
        ("tagpipe-gateway", "tag_request"),
        ("tagpipe-downloader", "download_queue_wait"),
        ("tagpipe-downloader", "download"),
        ("tagpipe-downloader", "dns_connect"),
        ("tagpipe-downloader", "transfer"),
        ("tagpipe-downloader", "decode"),
        ("tagpipe-downloader", "preprocess"),
        ("tagpipe-inference", "infer_queue_wait"),
        ("tagpipe-inference", "inference"),
        ("tagpipe-inference", "result_write"),
    ]
    starts = [one(*key).start_ns for key in order]
    assert starts == sorted(starts), list(zip(order, starts, strict=True))
    assert all(s.end_ns >= s.start_ns for s in mine)

    # The batch is a trace of its own, linked to this item's trace.
    (batch,) = [s for s in spans if s.name == "infer_batch" and trace_id in s.links]
    assert batch.service == "tagpipe-inference" and not batch.parent_id
    assert batch.attributes["tagpipe.batch_size"] == len(batch.links) >= 1
    return trace_id


def test_a_failed_download_is_a_complete_trace_and_one_timed_line(
    http: httpx.Client, observed: Observed, collector: Collector, images: ImageServer
) -> None:
    body = tag(http, [images.url("/status/404")])
    rid = body["request_id"]
    (item,) = body["items"]
    assert (item["status"], item["code"]) == ("error", "http_404")

    want = {"tag_request", "publish", "download_queue_wait", "download", "result_write"}
    spans = collector.wait_for(lambda s: want <= {x.name for x in trace_of(s, rid)})
    mine = trace_of(spans, rid)
    by_id = {s.span_id: s for s in mine}
    (write,) = [s for s in mine if s.name == "result_write"]
    assert write.service == "tagpipe-downloader"
    assert ancestors(write, by_id) == [
        ("tagpipe-downloader", "download"),
        ("tagpipe-gateway", "publish"),
        ("tagpipe-gateway", "tag_request"),
    ]
    assert "tagpipe-inference" not in {s.service for s in mine}

    def mine_timed(ln: dict[str, Any]) -> bool:
        return ln.get("event") == "item_timings" and ln.get("request_id") == rid

    (line,) = wait_lines(observed, "downloader-0", mine_timed)
    assert line["code"] == "http_404" and line["status"] == "error"
    assert line["trace_id"] == write.trace_id and line["item_id"] == item["item_id"]
    assert line["component"] == "downloader"
    assert line["end_to_end_ms"] >= line["download_queue_ms"] >= 0
    assert "inference_ms" not in line  # stages that never ran are left out
    assert [ln for ln in observed.log_lines("inference-0") if mine_timed(ln)] == []


# --- metrics --------------------------------------------------------------------


def test_metrics_count_exactly_what_was_sent(
    http: httpx.Client, observed: Observed, images: ImageServer
) -> None:
    def batch_lines() -> list[dict[str, Any]]:
        return [ln for ln in observed.log_lines("inference-0") if ln.get("event") == "batch"]

    before = {c: scrape(url) for c, url in observed.metrics.items()}
    lines_before = len(batch_lines())
    ok = [images.url(f"/img/chelsea.jpg?v=m{i}") for i in range(6)]
    bad = [images.url(f"/status/404?v=m{i}") for i in range(2)]
    requests = [[ok[0], ok[1]], [ok[2]], [ok[3], bad[0]], [ok[4], ok[5], bad[1]]]
    # Concurrent requests, so some batches hold more than one image.
    threads = [threading.Thread(target=tag, args=(http, urls)) for urls in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    # Results are written before the worker counts them, the request counters
    # move after the response is sent, log lines follow the counts: the wait is
    # every assertion below, on a fresh scrape each round.
    def check() -> None:
        after = {c: scrape(url) for c, url in observed.metrics.items()}
        gw, b_gw = after["gateway"], before["gateway"]
        posts = dict(route="/v1/tags", method="POST", status="200")
        assert delta(b_gw, gw, "tagpipe_gateway_requests_total", **posts) == len(requests)
        assert delta(b_gw, gw, "tagpipe_gateway_items_total", lane="realtime", status="ok") == 6
        assert delta(b_gw, gw, "tagpipe_gateway_items_total", status="error", code="http_404") == 2
        assert delta(b_gw, gw, "tagpipe_gateway_item_latency_seconds_count", lane="realtime") == 8
        assert total(gw, "tagpipe_gateway_inflight_requests") == 0
        # The API port's /metrics is the same registry (its own scrape is in flight there).
        api = after["gateway-api"]
        assert total(api, "tagpipe_gateway_items_total") == total(gw, "tagpipe_gateway_items_total")
        assert total(api, "tagpipe_gateway_inflight_requests") == 1

        dl, b_dl = after["downloader"], before["downloader"]
        assert delta(b_dl, dl, "tagpipe_downloader_items_total", outcome="published") == 6
        assert delta(b_dl, dl, "tagpipe_downloader_items_total", outcome="http_404") == 2
        assert delta(b_dl, dl, "tagpipe_downloader_stage_seconds_count", stage="queue") == 8
        assert delta(b_dl, dl, "tagpipe_downloader_stage_seconds_count", stage="decode") == 6
        assert delta(b_dl, dl, "tagpipe_downloader_body_bytes_count") == 6
        assert delta(b_dl, dl, "tagpipe_downloader_body_bytes_sum") == 6 * len(CAT_JPEG)
        assert total(dl, "tagpipe_downloader_inflight") == 0

        inf, b_inf = after["inference"], before["inference"]
        batches = delta(b_inf, inf, "tagpipe_inference_batches_total")
        assert 1 <= batches <= 6
        assert batches == len(batch_lines()) - lines_before  # the worker's own log agrees
        assert delta(b_inf, inf, "tagpipe_inference_batch_size_count") == batches
        assert delta(b_inf, inf, "tagpipe_inference_batch_size_sum") == 6
        assert delta(b_inf, inf, "tagpipe_inference_batch_seconds_count") == batches
        assert delta(b_inf, inf, "tagpipe_inference_results_total", status="ok") == 6
        assert delta(b_inf, inf, "tagpipe_inference_queue_wait_seconds_count", lane="realtime") == 6
        assert total(inf, "tagpipe_inference_inflight_items") == 0

        for component, samples in after.items():
            assert total(samples, "process_cpu_seconds_total") > 0, component

    settle(check)


def test_a_redelivered_failure_is_logged_and_counted_once(
    observed: Observed, images: ImageServer
) -> None:
    """After the dedupe window a repeat is a new message: one line, one count all the same."""
    stack = observed.stack
    assert stack.nats is not None
    task = DownloadTask(
        item_id="obs-repeat-0", request_id="obs-repeat", url=images.url("/status/404")
    )
    subject = stage_names(Stage.DOWNLOAD, stack.config.prefix).subject(Lane.REALTIME)
    url = stack.nats.url

    async def publish(msg_id: str) -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(subject, task.to_json(), headers={HDR_MSG_ID: msg_id})
        finally:
            await nc.close()

    def mine(ln: dict[str, Any]) -> bool:
        return ln.get("item_id") == task.item_id

    before = scrape(observed.metrics["downloader"])
    asyncio.run(publish("first"))
    assert len(wait_lines(observed, "downloader-0", lambda ln: mine(ln) and "code" in ln)) == 1
    asyncio.run(publish("second"))  # as if redelivered after a lost ack
    repeat = wait_lines(observed, "downloader-0", lambda ln: mine(ln) and "redelivery" in ln["msg"])
    assert len(repeat) == 1
    timed = [ln for ln in observed.log_lines("downloader-0") if mine(ln)]
    assert [ln.get("event") for ln in timed].count("item_timings") == 1
    after = scrape(observed.metrics["downloader"])
    assert delta(before, after, "tagpipe_downloader_items_total", outcome="http_404") == 1


def test_each_bulk_item_is_a_trace_of_its_own_linked_to_its_job(
    http: httpx.Client, collector: Collector, images: ImageServer
) -> None:
    urls = [images.url(f"/img/chelsea.jpg?v=bulk{i}") for i in range(3)]
    r = http.post("/v1/jobs", json=urls)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    def item_roots(spans: list[Span]) -> list[Span]:
        return [
            s
            for s in spans
            if s.name == "publish"
            and s.service == "tagpipe-gateway"
            and str(s.attributes.get("tagpipe.item_id", "")).startswith(job_id)
        ]

    def written(spans: list[Span]) -> set[str]:
        return {s.trace_id for s in spans if s.name == "result_write"}

    def check(spans: list[Span]) -> None:
        roots = item_roots(spans)
        assert len(roots) == 3 and all(not s.parent_id for s in roots)
        assert len({s.trace_id for s in roots}) == 3  # one trace per image
        (job_span,) = [
            s
            for s in spans
            if s.name == "submit_job" and s.attributes.get("tagpipe.job_id") == job_id
        ]
        assert all(s.links == (job_span.trace_id,) for s in roots)
        for root in roots:
            # Every service's spans, the downloader's included, not only the last write.
            assert root.trace_id in written(spans)
            services = {s.service for s in spans if s.trace_id == root.trace_id}
            assert services == SERVICES

    collector.until(check)
