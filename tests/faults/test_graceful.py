"""SIGTERM to each service in turn while a bulk job runs: each exits 0, its in-flight
work is finished or handed back for redelivery, and, restarted, the job completes
with exactly one result per item.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

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

N = 1200
VICTIMS = ("gateway", "downloader-0", "inference-0")


def test_sigterm_each_service_mid_job(
    make_stack: Callable[..., Stack], images: ImageServer, record: Callable[..., None]
) -> None:
    stack = make_stack()
    exits: dict[str, int | None] = {}
    raw_exits: dict[str, int | None] = {}
    at_signal: dict[str, int] = {}
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
        job_id = submit_job(http, image_urls(images, N, "term"))
        for k, name in enumerate(VICTIMS):
            wait_finished(http, job_id, (k + 1) * N // 6)
            at_signal[name] = job_status(http, job_id)["finished"]
            svc = service(stack, name)
            log_from = svc.log_path.stat().st_size
            svc.signal(signal.SIGTERM)
            assert svc.wait(30), f"{name} ignored SIGTERM"
            assert svc.proc is not None
            exits[name] = raw_exits[name] = svc.proc.returncode
            if name == "gateway" and exits[name] == -signal.SIGTERM:
                # uvicorn >= 0.29 re-raises the signal once its shutdown is complete.
                tail = svc.log_path.read_bytes()[log_from:]
                assert b"Application shutdown complete" in tail, tail[-2000:]
                exits[name] = 0
            svc.start()
            stack.wait_ready()
        acc = account(stack, http, job_id, N)
    assert exits == dict.fromkeys(VICTIMS, 0), exits
    assert max(at_signal.values()) < N, "the job was over before the last signal"
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes
    record(
        acc,
        duplicates_absorbed=redelivered_duplicates(stack),
        sigterm=list(VICTIMS),
        finished_at_signal=at_signal,
        exit_codes=raw_exits,
    )
