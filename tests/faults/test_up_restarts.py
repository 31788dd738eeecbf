"""kill -9 of each worker of a supervised stack (what `tagpipe up` runs) in the
middle of one bulk job: each comes back, and the job completes, nothing lost,
nothing twice.

One replica of each tier, so no survivor covers for the victim: only the
restart does. The gateway is killed while it may still be publishing the job's
items (a restarted gateway resumes them from Redis), the downloader and the
inference worker with items in flight (redelivered to their restarted selves
after ack_wait).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from tagpipe_cli.stack import Service, Stack
from tagpipe_cli.supervise import RestartPolicy, Supervisor

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

N = 900
VICTIMS = {"gateway": N // 10, "downloader-0": N // 3, "inference-0": N // 2}  # finished before
RESTART_WAIT_S = 60.0  # a hang guard for a loaded runner, not a speed claim


def wait_restarted(svc: Service) -> None:
    deadline = time.monotonic() + RESTART_WAIT_S
    while not (svc.crashes == 1 and len(svc.restarts) == 1 and svc.alive):
        assert time.monotonic() < deadline, f"{svc.name} was not restarted: {svc.log_tail(600)}"
        time.sleep(0.1)


def test_each_worker_killed_mid_job_is_restarted_and_the_job_completes(
    make_stack: Callable[..., Stack],
    images: ImageServer,
    record: Any,
) -> None:
    stack = make_stack(downloaders=1, inference=1)
    lines: list[str] = []
    stop = threading.Event()
    supervisor = Supervisor(stack, RestartPolicy(backoff_s=0.5), say=lines.append)
    # Restarted children die with the thread that started them: it lives until the stack stops.
    thread = threading.Thread(target=supervisor.run, args=(stop, 0.1), daemon=True)
    thread.start()
    killed_when: dict[str, int] = {}
    try:
        with httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
            job_id = submit_job(http, image_urls(images, N, "up-restarts"))
            for victim, after in VICTIMS.items():
                wait_finished(http, job_id, after, timeout_s=300)
                killed_when[victim] = job_status(http, job_id)["finished"]
                svc = service(stack, victim)
                svc.signal(signal.SIGKILL)
                assert svc.wait(10), f"{victim} survived SIGKILL"
                wait_restarted(svc)
            acc = account(stack, http, job_id, N)
    finally:
        stack.stop(grace_s=10)
        stop.set()
        thread.join(10)
    assert all(n < N for n in killed_when.values()), f"killed after the job ended: {killed_when}"
    assert_exactly_once(acc)
    assert acc.status["done"] == N, acc.codes  # every image is good: no error results either
    assert sorted(s.name for s in stack.crashed()) == sorted(VICTIMS)  # still visible as crashes
    for victim in VICTIMS:
        assert any(f"{victim} exited (signal 9)" in line for line in lines), lines
    assert not any("crash-looping" in line for line in lines), lines
    record(
        acc,
        duplicates_absorbed=redelivered_duplicates(stack),
        killed=sorted(VICTIMS),
        finished_at_kill=killed_when,
    )
