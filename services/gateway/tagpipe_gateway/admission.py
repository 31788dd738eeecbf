"""Real-time admission by expected wait: answer fast or refuse fast.

A fixed item limit says nothing of time: 5,000 queued items are two minutes of
work on a 2-core box and a few seconds on a GPU tier. So the gateway estimates
how long a new real-time item would wait, from

- the real-time backlog ahead of it (both stages; real-time items jump the bulk
  queue at each stage, so bulk work is not ahead of them), and
- the pipeline's measured drain rate: items leaving the inference stream per
  second over a moving window, counted only while the pipeline had work. An
  idle pipeline completes nothing and says nothing of its capacity, so idle
  time neither lowers the rate nor starts it from zero again.

and refuses (429 with Retry-After) when that wait exceeds the request's
deadline. Triton's queue policy and Ray Serve's `max_queued_requests` cap a
count; this caps the time a caller would actually wait. The fixed item limits
stay as a hard ceiling behind it.

Pure: the I/O side (`queue.BacklogCache`) feeds it readings.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Reading:
    at: float  # monotonic seconds
    completed: int  # items that ever left the inference stream (monotonic counter)
    backlog: int  # the whole pipeline's backlog at that moment


class DrainRate:
    """Items/s the pipeline completes while busy, over the last `window_s`."""

    def __init__(self, window_s: float = 10.0, min_span_s: float = 1.0) -> None:
        self.window_s = window_s
        self.min_span_s = min_span_s
        self._busy: deque[Reading] = deque()
        self._last: Reading | None = None
        self.rate: float | None = None  # None until measured once; then kept while idle

    def observe(self, r: Reading) -> None:
        prev, self._last = self._last, r
        if prev is None or r.completed < prev.completed:  # first reading, or a reset stream
            self._busy.clear()
            return
        if prev.backlog == 0 and r.backlog == 0:
            self._busy.clear()  # idle: the next busy stretch starts a new window
            return
        if not self._busy and prev.backlog > 0:
            self._busy.append(prev)  # busy already then; else the stretch starts at r
        self._busy.append(r)
        while len(self._busy) > 2 and r.at - self._busy[1].at >= self.window_s:
            self._busy.popleft()
        first = self._busy[0]
        span = r.at - first.at
        if span >= self.min_span_s:
            self.rate = (r.completed - first.completed) / span


@dataclass(frozen=True)
class Verdict:
    admit: bool
    expected_wait_s: float | None  # None when there is no measured rate yet
    retry_after_s: int = 0


def admit(ahead: int, items: int, rate: float | None, deadline_s: float) -> Verdict:
    """May `items` more real-time items join `ahead` queued ones and make `deadline_s`?

    With nothing ahead the wait is the service time alone: always admitted. With
    no measurement yet there is nothing to estimate from: admitted (the fixed
    limits still apply). A stalled pipeline (rate 0) admits nothing behind a queue.
    """
    if ahead <= 0 or rate is None:
        return Verdict(True, None)
    if rate <= 0:
        return Verdict(False, math.inf, retry_after_s=max(1, math.ceil(deadline_s)))
    wait = (ahead + items) / rate
    if wait <= deadline_s:
        return Verdict(True, wait)
    # When the queue ahead will have drained to what fits in a deadline.
    return Verdict(False, wait, retry_after_s=max(1, math.ceil(wait - deadline_s)))
