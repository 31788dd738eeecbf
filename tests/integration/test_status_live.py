"""`tagpipe status` against a live local stack (the launcher of `tagpipe up`), output parsed.

A bulk job of 40 photos plus one that the image server holds for 15 minutes: the 40
finish and the job stays `running`, so the view must show the job, its progress and the
workers' rates and batch sizes. Waits poll the CLI itself until what the asserts read
is there (no timing assertions).
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image
from tagpipe_cli.stack import Stack, StackConfig

from bench.imageserver import ImageServer
from tests.tools import BackgroundImageServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "status-test-key"
GOOD = 40
HOLD_S = "900"  # the held photo outlives the test: the job stays running throughout


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with BackgroundImageServer() as srv:
        srv.add("chelsea.jpg", _jpeg(skimage.data.chelsea()))  # type: ignore[no-untyped-call]
        yield srv


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    config = StackConfig(
        data_dir=tmp_path_factory.mktemp("stack"),
        model_dir=model_dir,
        allow_cidrs="127.0.0.0/8",
        metrics_port=0,  # every process serves /metrics, each on a free port
        inference_env={"TAGPIPE_INTRA_OP_THREADS": "1"},
        downloader_env={"TAGPIPE_TOTAL_TIMEOUT_S": HOLD_S, "TAGPIPE_ITEM_DEADLINE_S": HOLD_S},
        gateway_env={"TAGPIPE_API_KEYS": KEY},
    )
    with Stack(config) as running:
        yield running


def status_once(stack: Stack) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tagpipe_cli", "status", "--once",
         "--gateway", stack.gateway_url, "--api-key", KEY],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def rows(text: str) -> list[list[str]]:
    """The cells of every table row rich drew (`┃ header ┃`, `│ a │ b │`)."""
    return [
        [cell.strip() for cell in re.split("[│┃]", line.strip())[1:-1]]
        for line in text.splitlines()
        if line.strip()[:1] in ("│", "┃")
    ]


def parse(text: str) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """({stage: {column: cell}}, {job id: {column: cell}})."""
    stages: dict[str, dict[str, str]] = {}
    jobs: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for cells in rows(text):
        if cells[0] in ("STAGE", "JOB"):
            header = cells
        elif header[0] == "STAGE":
            stages[cells[0]] = dict(zip(header, cells, strict=True))
        else:
            jobs[cells[0]] = dict(zip(header, cells, strict=True))
    return stages, jobs


STAGES = {"download": 1, "infer": 0}  # what is left per stage: the held photo


def _settled(stage: dict[str, str]) -> bool:
    if not stage or stage["WORKERS"] != "1" or float(stage["IMAGES/S (1m)"]) <= 0:
        return False
    # The held photo is the download stage's one item in flight (or, after an ack-wait
    # redelivery, waiting for one); inference has nothing left once its acks are in.
    left = int(stage["BACKLOG"]) + int(stage["IN FLIGHT"])
    return left == STAGES[stage["STAGE"]]


def settled(stack: Stack, job_id: str, within_s: float = 240.0) -> str:
    """Poll `tagpipe status --once` until the view shows the job's 40 done, each stage's
    worker with a rate and only the held photo left; returns that output (the wait is on
    what the asserts read)."""
    deadline = time.monotonic() + within_s
    text = ""
    while time.monotonic() < deadline:
        text = status_once(stack)
        stages, jobs = parse(text)
        job = jobs.get(job_id, {})
        if job.get("DONE") == str(GOOD) and all(_settled(stages.get(s, {})) for s in STAGES):
            return text
        time.sleep(1.0)
    raise AssertionError(f"the view never settled:\n{text}")


def test_status_shows_stages_workers_and_the_running_job(stack: Stack, images: ImageServer) -> None:
    urls = [images.url(f"/img/chelsea.jpg?v={i}") for i in range(GOOD)]
    urls.append(images.url(f"/slow?name=chelsea.jpg&delay_s={HOLD_S}"))
    r = httpx.post(
        stack.gateway_url + "/v1/jobs",
        json=urls,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    text = settled(stack, job_id)
    stages, jobs = parse(text)
    assert list(stages) == ["download", "infer"]
    job = jobs[job_id]
    assert job["STATE"] == "running"
    assert (job["TOTAL"], job["FAILED"], job["PROGRESS"]) == (str(GOOD + 1), "0", "98%")
    infer = stages["infer"]
    assert float(infer["BATCH"]) >= 1.0  # mean images per batch over the last minute
    assert stages["download"]["BATCH"] == "-"  # the downloader has no batches
    assert (infer["BACKLOG"], infer["IN FLIGHT"]) == ("0", "0")
    download = stages["download"]
    assert int(download["BACKLOG"]) + int(download["IN FLIGHT"]) == 1  # the held photo


def test_the_view_needs_the_api_key(stack: Stack) -> None:
    r = httpx.get(stack.gateway_url + "/v1/pipeline", timeout=30)
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    out = subprocess.run(
        [sys.executable, "-m", "tagpipe_cli", "status", "--once", "--gateway", stack.gateway_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "HTTP 401" in out.stdout


def test_every_process_serves_its_metrics(stack: Stack) -> None:
    expected = {
        "gateway": "tagpipe_gateway_",
        "downloader": "tagpipe_downloader_items_total",
        "inference": "tagpipe_inference_batches_total",
    }
    for svc in stack.services:
        assert svc.metrics_url is not None, svc.name
        body = httpx.get(svc.metrics_url, timeout=30).text
        assert expected[svc.name.split("-")[0]] in body, svc.name
