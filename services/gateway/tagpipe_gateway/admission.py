"""Real-time admission by expected wait: answer fast or refuse fast.

A fixed item limit says nothing of time: 5,000 queued items are two minutes of
work on a 2-core box and a few seconds on a GPU tier. So the gateway estimates
how long a new real-time item would wait, by Little's law: the real-time work in
the pipeline now (both stages; real-time items jump the bulk queue at each
stage, so bulk work is not ahead of them) over the rate at which the pipeline is
completing items now (items leaving the inference stream per second over a
short moving window). Under light load that is about one service time; past
capacity the queue grows while the rate cannot, and the estimate grows with it.

It refuses (429 with Retry-After) when that wait exceeds the request's deadline.
Triton's queue policy and Ray Serve's `max_queued_requests` cap a count; this
caps the time a caller would actually wait. The fixed item limits stay as a
hard ceiling behind it.

The rate is the throughput of the current busy stretch. A new stretch has none
for its first second; until then the last stretch's rate stands in (a burst
after a quiet minute must not be admitted blind: at 3x capacity that second
alone queued several seconds of work, then everything was refused while it
drained, and so on in waves). A stand-in that is too low refuses a little too
much for that second only; the stretch's own rate replaces it. Only before any
busy stretch at all is there no estimate, and the request is admitted; the fixed
limits still apply.

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
    """Items/s the pipeline completed over the current busy stretch (its last
    `window_s`): None while there is no such stretch of at least `min_span_s`."""

    def __init__(self, window_s: float = 5.0, min_span_s: float = 1.0) -> None:
        self.window_s = window_s
        self.min_span_s = min_span_s
        self._busy: deque[Reading] = deque()
        self._current: float | None = None  # this busy stretch's rate
        self._last: float | None = None  # the previous stretch's, standing in meanwhile

    @property
    def rate(self) -> float | None:
        return self._current if self._current is not None else self._last

    def observe(self, r: Reading) -> None:
        if r.backlog == 0 or (self._busy and r.completed < self._busy[-1].completed):
            # Idle (or the streams were recreated): this stretch is over.
            self._busy.clear()
            self._last, self._current = self.rate, None
            if r.backlog == 0:
                return
        self._busy.append(r)
        while len(self._busy) > 2 and r.at - self._busy[1].at >= self.window_s:
            self._busy.popleft()
        first = self._busy[0]
        span = r.at - first.at
        if span >= self.min_span_s:
            self._current = (r.completed - first.completed) / span


@dataclass(frozen=True)
class Verdict:
    admit: bool
    expected_wait_s: float | None  # None when there is no measured rate yet
    retry_after_s: int = 0


def admit(ahead: int, items: int, rate: float | None, deadline_s: float) -> Verdict:
    """May `items` more real-time items join the `ahead` in the pipeline and make
    `deadline_s`?

    With nothing ahead the wait is the service time alone: always admitted. With
    no measurement yet there is nothing to estimate from: admitted (the fixed
    limits still apply). A stalled pipeline (rate 0) admits nothing behind a queue.
    """
    if ahead <= 0 or rate is None:
        return Verdict(True, None)
    if rate <= 0:
        return Verdict(False, math.inf, retry_after_s=max(1, math.ceil(deadline_s)))
    wait = (ahead + items - 1) / rate  # Little's law, plus the request's own extra items
    if wait <= deadline_s:
        return Verdict(True, wait)
    # When the queue ahead will have drained to what fits in a deadline.
    return Verdict(False, wait, retry_after_s=max(1, math.ceil(wait - deadline_s)))


def bulk_limit(rate: float | None, target_wait_s: float, floor: int) -> int:
    """The pipeline backlog up to which bulk publishing goes on.

    The work the pipeline drains in `target_wait_s` at its measured rate (Little's
    law again), so the bulk queue grows with the fleet: a fixed item count capped a
    6,250/s fleet near 1,300/s (2,000 items at 1.5 s each). Never below `floor`,
    which also stands until a rate is measured; a stalled pipeline (rate 0) gets the
    floor, so a stall cannot fill the streams. Real-time work is not behind this
    queue: it has its own lane at every stage, polled first.
    """
    if rate is None:
        return floor
    return max(floor, math.ceil(rate * target_wait_s))
