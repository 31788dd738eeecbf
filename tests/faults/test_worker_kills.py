"""kill -9 of a worker in the middle of a 2,000-item bulk job: nothing lost, nothing twice.

Two replicas of each tier, so one survives; the victim's unacked messages are
redelivered to it after ack_wait. Exactly-once is checked four ways: the job
counters, the job's result stream length, distinct item (and client) ids in it,
and the per-item result keys.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from tagpipe_cli.stack import Stack

from bench.imageserver import ImageServer
from tests.faults.kit import (
    account,
    assert_exactly_once,
    image_urls,
    job_status,
    redelivered_duplicates,
    service,
    submit_job,
    wait_finished,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 2000


@pytest.mark.parametrize("victim", ["inference-0", "downloader-0"])
def test_kill_9_mid_job_loses_and_duplicates_nothing(
    make_stack: Callable[..., Stack],
    images: ImageServer,
    record: Any,
    victim: str,
) -> None:
    stack = make_stack()
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
        job_id = submit_job(http, image_urls(images, N, f"kill-{victim}"))
        wait_finished(http, job_id, N // 5)
        before = job_status(http, job_id)["finished"]
        svc = service(stack, victim)
        if victim.startswith("inference"):  # it was busy: batches ran before the kill
            assert "batch done" in svc.log_path.read_text(errors="replace")
        svc.signal(signal.SIGKILL)
        assert svc.wait(10), f"{victim} survived SIGKILL"
        assert svc.proc is not None and svc.proc.returncode == -signal.SIGKILL
        killed_at = time.monotonic()
        acc = account(stack, http, job_id, N)
        took = time.monotonic() - killed_at
    assert before < N, "the job finished before the kill: nothing was in flight"
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes  # every image is good: no error results either
    record(
        acc,
        duplicates_absorbed=redelivered_duplicates(stack),
        killed=victim,
        finished_at_kill=before,
        seconds_after_kill=round(took, 1),
    )
