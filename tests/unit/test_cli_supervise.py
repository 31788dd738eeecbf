"""`tagpipe up`'s supervisor: the restart policy as pure functions, and the
supervisor over real (tiny) processes with a clock the test moves."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from tagpipe_cli.stack import Service, Stack, StackConfig
from tagpipe_cli.supervise import RestartPolicy, Supervisor

POLICY = RestartPolicy(backoff_s=1.0, backoff_max_s=10.0, loop_restarts=5, loop_window_s=60.0)


def test_backoff_doubles_with_recent_restarts_and_is_capped() -> None:
    assert [POLICY.delay([0.0] * n, now=1.0) for n in range(6)] == [1, 2, 4, 8, 10, 10]


def test_restarts_outside_the_window_are_forgotten() -> None:
    old = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert POLICY.crash_loop(old, now=30.0)  # 5 restarts in the last minute
    assert not POLICY.crash_loop(old, now=61.5)  # the first two have left the window
    assert POLICY.delay(old, now=200.0) == 1.0  # a calm service starts over at the base


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stack_of(tmp_path: Path, argv: list[str]) -> Stack:
    stack = Stack(StackConfig(data_dir=tmp_path))
    log = tmp_path / "downloader-0.log"
    stack.services = [Service("downloader-0", argv, dict(os.environ), log, None)]
    stack.services[0].start()
    return stack


def died(svc: Service) -> None:
    assert svc.wait(10), "the test process did not exit"


def test_a_killed_worker_is_restarted_and_still_counted_as_crashed(tmp_path: Path) -> None:
    clock, lines = Clock(), list[str]()
    stack = stack_of(tmp_path, ["sleep", "60"])
    sup = Supervisor(stack, POLICY, say=lines.append, clock=clock)
    (svc,) = stack.services
    first = svc.proc
    try:
        assert sup.tick() is None and stack.crashed() == []
        svc.kill()
        assert sup.tick() is None  # found dead: restart scheduled after the back-off
        assert not svc.alive and svc.crashes == 1
        assert "downloader-0 exited (signal 9); restarting in 1 s" in lines[0]
        clock.now += 0.5
        sup.tick()
        assert not svc.alive  # not yet due
        clock.now += 0.6
        sup.tick()
        assert svc.alive and svc.proc is not first and svc.restarts == [clock.now]
        assert stack.dead() == [] and stack.crashed() == [svc]
    finally:
        stack.stop(grace_s=5)


def test_a_crash_loop_stops_with_one_line_naming_the_worker_and_its_log(
    tmp_path: Path,
) -> None:
    clock, lines = Clock(), list[str]()
    stack = stack_of(tmp_path, ["sh", "-c", "exit 3"])
    sup = Supervisor(stack, POLICY, say=lines.append, clock=clock)
    (svc,) = stack.services
    verdict = None
    for _ in range(20):
        died(svc)
        verdict = sup.tick()  # found dead: scheduled, or the crash loop
        if verdict is not None:
            break
        clock.now = sup.due[svc.name]  # restarts as soon as the back-off allows: 1, 2, 4, 8 s
        assert sup.tick() is None
    assert len(svc.restarts) == 5
    assert verdict is not None and "\n" not in verdict
    assert "downloader-0 is crash-looping" in verdict and "exit 3" in verdict
    assert str(svc.log_path) in verdict


def test_a_calm_worker_restarts_forever_without_a_verdict(tmp_path: Path) -> None:
    # One exit every 20 s is no crash loop: 3 restarts a minute at most.
    clock = Clock()
    stack = stack_of(tmp_path, ["sh", "-c", "exit 1"])
    sup = Supervisor(stack, POLICY, say=lambda _: None, clock=clock)
    (svc,) = stack.services
    for _ in range(10):
        died(svc)
        assert sup.tick() is None
        clock.now += 20.0
        assert sup.tick() is None
    assert len(svc.restarts) == 10


def test_nothing_restarts_while_the_stack_is_stopping(tmp_path: Path) -> None:
    stack = stack_of(tmp_path, ["sleep", "60"])
    sup = Supervisor(stack, POLICY, say=lambda _: None, clock=Clock())
    stack.stop(grace_s=5)
    assert stack.dead() and sup.tick() is None
    assert sup.due == {} and stack.services[0].crashes == 0


def test_run_returns_1_and_says_the_line_once_a_worker_crash_loops(tmp_path: Path) -> None:
    lines = list[str]()
    stack = stack_of(tmp_path, ["sh", "-c", "exit 3"])
    fast = RestartPolicy(backoff_s=0.01, backoff_max_s=0.05)
    try:
        assert Supervisor(stack, fast, say=lines.append).run(threading.Event(), every_s=0.01) == 1
    finally:
        stack.stop(grace_s=5)
    assert len(lines) == 6  # five restarts, then the verdict
    assert "crash-looping" in lines[-1] and "downloader-0" in lines[-1]


def test_run_returns_0_when_asked_to_stop(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    stack = stack_of(tmp_path, ["sleep", "60"])
    try:
        assert Supervisor(stack, POLICY).run(stop, every_s=0.01) == 0
    finally:
        stack.stop(grace_s=5)
