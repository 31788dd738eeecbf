"""End to end on this machine: NATS, Redis, gateway, downloader and inference as
separate processes (the same launcher as `tagpipe up`), the real ONNX model,
images served over HTTP by a local server.

One stack is shared by every case here (module scope) to keep the wall time down.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image
from tagpipe_cli.stack import Stack, StackConfig

from bench.imageserver import ImageServer
from tests.tools import BackgroundImageServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAT_WORDS = ("cat", "tabby", "lynx")
COFFEE_WORDS = ("espresso", "cup", "coffee", "eggnog")


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


CAT_JPEG = jpeg(skimage.data.chelsea())  # type: ignore[no-untyped-call]
COFFEE_JPEG = jpeg(skimage.data.coffee())  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with BackgroundImageServer() as srv:
        srv.add("chelsea.jpg", CAT_JPEG)
        srv.add("coffee.jpg", COFFEE_JPEG)
        srv.add("page.html", b"<html>not an image</html>", content_type="text/html")
        yield srv


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    config = StackConfig(
        data_dir=tmp_path_factory.mktemp("stack"),
        model_dir=model_dir,
        allow_cidrs="127.0.0.0/8",  # the image server is local
        inference_env={"TAGPIPE_INTRA_OP_THREADS": "1"},  # 2-core CI: leave a core to the rest
        gateway_env={
            "TAGPIPE_REALTIME_TIMEOUT_S": "60",
            "TAGPIPE_REALTIME_DEFAULT_TIMEOUT_S": "60",
        },
    )
    with Stack(config) as running:
        yield running
    # Stopped cleanly: no service or server left behind.
    assert [s.name for s in running.services if s.alive] == []
    assert running.nats is not None and running.nats.proc is not None
    assert running.nats.proc.poll() is not None


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway_url, timeout=90) as client:
        yield client


def labels(item: dict[str, Any], k: int = 3) -> list[str]:
    return [t["label"].lower() for t in item["tags"][:k]]


def wait_job(http: httpx.Client, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        if status["state"] in ("completed", "cancelled") and status["finished"] == status["total"]:
            return status
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not finish: {status}")


def test_tags_by_url_and_by_upload(http: httpx.Client, images: ImageServer) -> None:
    by_url = http.post(
        "/v1/tags",
        json={"urls": [images.url("/img/chelsea.jpg"), images.url("/img/coffee.jpg")]},
    )
    assert by_url.status_code == 200, by_url.text
    cat, coffee = by_url.json()["items"]
    assert cat["status"] == coffee["status"] == "ok"
    assert any(w in label for label in labels(cat) for w in CAT_WORDS), labels(cat)
    assert any(w in label for label in labels(coffee) for w in COFFEE_WORDS), labels(coffee)

    upload = http.post(
        "/v1/tags?top_k=3",
        content=CAT_JPEG,
        headers={"Content-Type": "image/jpeg"},
    )
    assert upload.status_code == 200, upload.text
    (item,) = upload.json()["items"]
    assert len(item["tags"]) == 3
    assert labels(item) == labels(cat)  # same pixels, same answer, whichever way they came


def test_cli_tags_a_local_file(stack: Stack, tmp_path: Path) -> None:
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(COFFEE_JPEG)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tagpipe_cli",
            "tag",
            "--json",
            "--gateway",
            stack.gateway_url,
            str(photo),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (item,) = json.loads(out.stdout)
    assert item["source"] == str(photo)
    assert any(w in label for label in labels(item) for w in COFFEE_WORDS)


def test_bulk_job_of_500_with_404s_and_non_images(http: httpx.Client, images: ImageServer) -> None:
    good = [images.url(f"/img/{'chelsea' if i % 2 else 'coffee'}.jpg?v={i}") for i in range(460)]
    missing = [images.url(f"/img/missing-{i}.jpg") for i in range(25)]
    pages = [images.url(f"/img/page.html?v={i}") for i in range(15)]
    items = [{"url": u, "id": f"item-{n}"} for n, u in enumerate(good + missing + pages)]
    body = "".join(json.dumps(i) + "\n" for i in items)
    job = http.post("/v1/jobs", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert job.status_code == 202, job.text
    status = wait_job(http, job.json()["job_id"])
    assert status["state"] == "completed"
    assert (status["total"], status["done"], status["failed"]) == (500, 460, 40)

    lines = http.get(f"/v1/jobs/{status['job_id']}/results").text.splitlines()
    results = {r["client_item_id"]: r for r in map(json.loads, lines)}
    assert len(lines) == len(results) == 500
    codes = {results[f"item-{n}"]["code"] for n in range(460, 485)}
    assert codes == {"http_404"}
    codes = {results[f"item-{n}"]["code"] for n in range(485, 500)}
    assert len(codes) == 1 and codes <= {"not_an_image", "unsupported_format"}, codes
    assert all(results[f"item-{n}"]["status"] == "ok" for n in range(460))


def test_cancel_midway_accounts_for_every_item(http: httpx.Client, images: ImageServer) -> None:
    # Slow responses keep most of the job queued when the cancel arrives.
    urls = [images.url(f"/img/chelsea.jpg?v=c{i}&latency_ms=300") for i in range(1500)]
    job_id = http.post("/v1/jobs", json=urls).json()["job_id"]
    deadline = time.monotonic() + 60
    while http.get(f"/v1/jobs/{job_id}").json()["finished"] < 20:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelled = http.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    status = wait_job(http, job_id)
    assert status["state"] == "cancelled"
    assert status["total"] == 1500
    assert status["done"] + status["failed"] + status["cancelled"] == 1500
    assert status["cancelled"] > 0 and status["done"] >= 20
    # Cancel writes nothing per item: the results are those of the items that ran.
    results = [json.loads(line) for line in http.get(f"/v1/jobs/{job_id}/results").iter_lines()]
    assert 20 <= len(results) < 1500
    assert not [r for r in results if r.get("code") == "cancelled"]
