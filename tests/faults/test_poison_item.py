"""A poison item that kills its worker on every delivery: the job still completes.

One downloader with one slot (one item at a time), so only the poison item dies
with it. The test plays the poison: it reads the downloader's own log, and each
time the worker takes the poison item ("took item" with that item id) it kills
the worker with SIGKILL and starts it again, as Kubernetes would. After
max_deliver deliveries JetStream gives up on the message; its MAX_DELIVERIES
advisory, kept in the advisory stream, is settled by the restarted downloader
(stranded.py): the poison item ends as one retries_exhausted result and the
other 199 as ok, each exactly once, and the job reaches `completed`.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tagpipe_cli.stack import Service, Stack
from tagpipe_common.redis_io import connect_redis_sync
from tagpipe_common.subjects import LANES, Stage, stage_names
from tagpipe_gateway.submit import item_id_for

from bench.imageserver import ImageServer
from tests.faults.kit import (
    KEYS,
    account,
    assert_exactly_once,
    consumer_states,
    image_urls,
    job_status,
    service,
    submit_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 200
POISON = 57  # any index; not the first, so the worker is busy before it
MAX_DELIVER = 3


class LogWatch:
    """New JSON lines of a service's log (it appends across restarts)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_lines(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        out = []
        for raw in chunk[:end].splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue  # not a log record (a traceback on stderr)
            if isinstance(doc, dict):
                out.append(doc)
        return out


def kill_and_restart(svc: Service) -> None:
    svc.signal(signal.SIGKILL)
    assert svc.wait(10), f"{svc.name} survived SIGKILL"
    assert svc.proc is not None and svc.proc.returncode == -signal.SIGKILL
    svc.start()  # from this (the main) thread, which outlives the stack


def play_poison(
    stack: Stack, http: httpx.Client, job_id: str, poison_id: str, timeout_s: float = 300
) -> list[int]:
    """Kill the downloader on each delivery of the poison item until the job ends.
    Returns the delivery numbers the worker logged for it."""
    svc = service(stack, "downloader-0")
    watch = LogWatch(svc.log_path)
    taken: list[int] = []
    deadline = time.monotonic() + timeout_s
    while True:
        for line in watch.new_lines():
            if line.get("msg") == "took item" and line.get("item_id") == poison_id:
                taken.append(int(line["delivery"]))
                kill_and_restart(svc)
        status = job_status(http, job_id)
        if status["state"] in ("completed", "cancelled") and status["finished"] == N:
            return taken
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} did not finish: {status}; poison deliveries {taken}\n"
                f"{consumer_states(stack)}\n{svc.log_tail()}"
            )
        time.sleep(0.1)


def stranded_lines(svc: Service, item_id: str) -> list[dict[str, Any]]:
    lines = LogWatch(svc.log_path).new_lines()
    return [x for x in lines if x.get("event") == "stranded" and x.get("item_id") == item_id]


def test_poison_item_that_kills_its_worker_ends_as_retries_exhausted(
    make_stack: Callable[..., Stack], images: ImageServer, record: Any
) -> None:
    stack = make_stack(
        downloaders=1,
        inference=1,
        max_deliver=MAX_DELIVER,
        env={"TAGPIPE_STRANDED_POLL_S": "1"},
        downloader_env={
            "TAGPIPE_MAX_INFLIGHT": "1",  # one slot: only the poison item dies with it
            "TAGPIPE_FETCH_BATCH": "1",
            "TAGPIPE_LOG_LEVEL": "DEBUG",  # "took item" is a DEBUG line
        },
    )
    urls = image_urls(images, N, "poison")
    # The poison: a download that would hang for minutes; the kill comes long before.
    urls[POISON] = images.url("/slow?delay_s=600&name=never")
    started = time.monotonic()
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
        job_id = submit_job(http, urls)
        poison_id = item_id_for(job_id, f"c{POISON}", POISON)
        taken = play_poison(stack, http, job_id, poison_id)
        took = time.monotonic() - started
        acc = account(stack, http, job_id, N)
    assert taken == list(range(1, MAX_DELIVER + 1)), taken  # killed on every delivery
    assert acc.status["state"] == "completed", acc.status
    assert_exactly_once(acc)
    assert acc.status["done"] == N - 1 and acc.status["failed"] == 1, acc.status
    assert acc.codes == {"retries_exhausted": 1}, acc.codes
    poison = stack_result(stack, poison_id)
    assert poison["code"] == "retries_exhausted" and poison["client_item_id"] == f"c{POISON}"
    assert poison["source"] == urls[POISON]
    # Settled through the advisory, by the restarted downloader, once.
    downloader = service(stack, "downloader-0")
    settled = stranded_lines(downloader, poison_id)
    assert [x["first"] for x in settled] == [True], settled
    assert settled[0]["deliveries"] == MAX_DELIVER
    # Nothing left in the work stream: the message was deleted, never to come back.
    states = consumer_states(stack)
    for lane in LANES:
        name = stage_names(Stage.DOWNLOAD).consumer(lane)
        assert states[name]["pending"] == 0 and states[name]["ack_pending"] == 0, states
    record(acc, poison_deliveries_killed=len(taken), seconds=round(took, 1))


def stack_result(stack: Stack, item_id: str) -> dict[str, Any]:
    r = connect_redis_sync(stack.redis_url)
    try:
        raw = r.get(KEYS.result(item_id))
    finally:
        r.close()
    assert raw is not None, f"no result for {item_id}"
    doc: dict[str, Any] = json.loads(raw)
    return doc
