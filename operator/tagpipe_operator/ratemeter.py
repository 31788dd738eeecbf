"""Rates from JetStream counters over a window: pure, state in and out.

The operator reads, per stage and per tick, the stream's counters (see
`reconcile.read_counters`): every message ever published to the stage's stream
(its last sequence), how many of those have left it (WorkQueue retention deletes
a message on its ack, so completed = last sequence - messages still stored), and
the consumers' pending and ack-pending counts. `observe()` keeps the readings of
the last `window_s` and turns them into a `RateReading` for `decide()`.
`tagpipe simulate` feeds its own cumulative counts through the same function.

Rates come from differences of monotonic counters over a window, never from
one tick: a tick's counts are lumpy (batches, fetches), a window is not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counters:
    """One reading of a stage's counters at `at` (seconds, any monotonic clock)."""

    at: float
    arrived: int
    """Messages ever published to the stage's stream (its last sequence number)."""
    completed: int
    """Messages that have left the stream: acked (or terminated)."""
    queued: int
    """Delivered to no one yet: the consumers' num_pending."""
    in_service: int
    """Delivered and not yet acked: the consumers' num_ack_pending."""


@dataclass(frozen=True)
class RateReading:
    """What decide() is told about a stage's traffic."""

    measured_at: float
    """When the newest reading in the window was taken: decide() ignores an old one."""
    arrival_per_s: float
    completed_per_s: float
    queued: int
    """The newest reading's queue: what must be drained."""
    in_service: float
    """Mean messages in service over the window, the same span the rates cover."""


@dataclass(frozen=True)
class MeterState:
    readings: tuple[Counters, ...] = ()
    """Oldest first: the window's readings plus one at or before its start."""


def observe(
    state: MeterState, reading: Counters | None, window_s: float
) -> tuple[MeterState, RateReading | None]:
    """Add a reading (None: this tick's read failed) and return the window's rates.

    A failed read leaves the state as it was, and the rates keep the time of the
    last good reading, so decide() sees them grow stale instead of being guessed.
    A counter that went backwards (stream deleted and recreated) restarts the
    window. Rates need two readings a positive span apart; before that, None.
    """
    readings = state.readings
    if reading is not None:
        last = readings[-1] if readings else None
        if last is not None and (
            reading.arrived < last.arrived or reading.completed < last.completed
        ):
            readings = ()
        if last is None or reading.at > last.at:
            readings = (*readings, reading)
        # Keep one reading at or before the window's start as the anchor of the span.
        start = reading.at - window_s
        while len(readings) > 2 and readings[1].at <= start:
            readings = readings[1:]
    new_state = MeterState(readings)
    return new_state, rates(new_state)


def rates(state: MeterState) -> RateReading | None:
    if len(state.readings) < 2:
        return None
    first, last = state.readings[0], state.readings[-1]
    span = last.at - first.at
    if span <= 0:
        return None
    # The anchor closes the previous window; the in-service mean covers the span.
    inside = state.readings[1:]
    return RateReading(
        measured_at=last.at,
        arrival_per_s=(last.arrived - first.arrived) / span,
        completed_per_s=(last.completed - first.completed) / span,
        queued=last.queued,
        in_service=sum(r.in_service for r in inside) / len(inside),
    )
