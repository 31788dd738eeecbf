"""`tagpipe up`'s supervisor: a worker that dies is started again, with back-off,
as a Kubernetes restartPolicy would; a crash loop stops the whole stack.

The rules, in the order they apply to a service found dead:
1. It was restarted `loop_restarts` times within `loop_window_s` already: a
   crash loop. Restarting it again would only hide the fault, so the stack stops
   with one line naming the service and its log.
2. Otherwise it starts again after `backoff_s * 2**recent` (capped at
   `backoff_max_s`), `recent` being its restarts within the window: a service
   killed once comes back at once, one that keeps dying slows down.

A restarted service keeps the count (`Service.crashes`), so `Stack.crashed()`
still tells a test or a benchmark that something died, after the fact.
The NATS and Redis servers are not restarted: their data directories are the
stack's state, and a stack without them is better stopped than limping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tagpipe_cli.stack import Service, Stack


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0  # the first restart's delay
    backoff_max_s: float = 30.0
    loop_restarts: int = 5  # this many restarts within loop_window_s: a crash loop
    loop_window_s: float = 60.0

    def recent(self, restarts: list[float], now: float) -> int:
        return sum(1 for t in restarts if now - t < self.loop_window_s)

    def crash_loop(self, restarts: list[float], now: float) -> bool:
        return self.recent(restarts, now) >= self.loop_restarts

    def delay(self, restarts: list[float], now: float) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2.0 ** self.recent(restarts, now))


@dataclass
class Supervisor:
    stack: Stack
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    say: Callable[[str], None] = lambda line: print(line, flush=True)
    clock: Callable[[], float] = time.monotonic
    due: dict[str, float] = field(default_factory=dict)  # service -> when it restarts

    def tick(self) -> str | None:
        """Restart what is due; the crash-loop line when the stack must stop."""
        if self.stack.stopping:
            return None  # services are being stopped on purpose
        now = self.clock()
        for svc in self.stack.dead():
            if svc.name not in self.due:
                if self.policy.crash_loop(svc.restarts, now):
                    return self._crash_loop_line(svc, now)
                self._schedule(svc, now)
            elif now >= self.due[svc.name]:
                del self.due[svc.name]
                svc.restarts.append(now)
                svc.start()
        return None

    def _schedule(self, svc: Service, now: float) -> None:
        svc.crashes += 1
        delay = self.policy.delay(svc.restarts, now)
        self.due[svc.name] = now + delay
        self.say(
            f"tagpipe up: {svc.name} exited ({_exit(svc)}); restarting in {delay:g} s"
            f" (restart {len(svc.restarts) + 1}; log {svc.log_path})"
        )

    def _crash_loop_line(self, svc: Service, now: float) -> str:
        n = self.policy.recent(svc.restarts, now)
        window = self.policy.loop_window_s
        return (
            f"tagpipe up: {svc.name} is crash-looping ({n} restarts in {window:g} s,"
            f" last {_exit(svc)}); stopping; see {svc.log_path}"
        )

    def run(self, stop: threading.Event, every_s: float = 0.5) -> int:
        """Supervise until `stop` is set (0) or a service crash-loops (1).

        Call it from the thread that started the stack, or one that outlives
        it: restarted children die with the thread that started them.
        """
        while not stop.wait(every_s):
            line = self.tick()
            if line is not None:
                self.say(line)
                return 1
        return 0


def _exit(svc: Service) -> str:
    code = svc.proc.returncode if svc.proc is not None else None
    if code is not None and code < 0:
        return f"signal {-code}"
    return f"exit {code}"
