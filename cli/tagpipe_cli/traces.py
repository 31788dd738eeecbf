"""Traffic traces for `tagpipe simulate`: integer arrivals per tick.

Arrivals are whole images per tick (never fractions) so the simulator can check
conservation exactly: every arrival is served or still queued at the end.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

DAY_S = 86_400
DIURNAL_IMAGES_PER_DAY = 500_000_000

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Trace:
    name: str
    tick_s: float
    arrivals: IntArray  # images arriving in each tick

    @property
    def duration_s(self) -> float:
        return self.tick_s * len(self.arrivals)

    @property
    def total(self) -> int:
        return int(self.arrivals.sum())

    @property
    def peak_rate(self) -> float:
        """Highest per-second rate over any tick (images/s)."""
        return float(self.arrivals.max()) / self.tick_s

    @property
    def mean_rate(self) -> float:
        return self.total / self.duration_s


def _integerise(rates: npt.NDArray[np.float64], tick_s: float, total: int | None) -> IntArray:
    """Rates (img/s) per tick -> integer arrivals per tick.

    Rounding the cumulative sum, not each tick, keeps the total exact (to the
    image) without biasing any part of the day.
    """
    expected = np.clip(rates, 0.0, None) * tick_s
    if total is not None:
        expected = expected * (total / expected.sum())
    cumulative = np.rint(np.cumsum(expected)).astype(np.int64)
    arrivals = np.diff(cumulative, prepend=np.int64(0))
    return arrivals.astype(np.int64)


def diurnal(
    tick_s: float = 10.0,
    images_per_day: int = DIURNAL_IMAGES_PER_DAY,
    peak_to_mean: float = 1.5,
    noise: float = 0.03,
    seed: int = 7,
) -> Trace:
    """One day of traffic: a cosine with its trough at 04:00 and crest at 16:00.

    500M/day is a mean of 5,787 img/s; the default crest of 1.5x the mean gives
    about 8,700 img/s, over the 6,250 img/s the platform is sized for, so the
    autoscaler has real work to do. Multiplicative noise (seeded) keeps the
    curve from being unrealistically smooth; the total is renormalised after.
    """
    n = round(DAY_S / tick_s)
    t = np.arange(n) * tick_s
    mean = images_per_day / DAY_S
    amplitude = peak_to_mean - 1.0
    phase = 2 * math.pi * (t - 16 * 3600) / DAY_S
    rates = mean * (1.0 + amplitude * np.cos(phase))
    rng = np.random.default_rng(seed)
    rates = rates * (1.0 + noise * rng.standard_normal(n))
    return Trace("diurnal", tick_s, _integerise(rates, tick_s, images_per_day))


def burst(
    tick_s: float = 10.0,
    duration_s: int = DAY_S,
    base_rate: float = 2_000.0,
    burst_rate: float = 12_000.0,
    burst_len_s: int = 900,
    every_s: int = 4 * 3600,
    first_at_s: int = 3600,
) -> Trace:
    """A steady base with square bursts (a bulk job landing): the oscillation test."""
    n = round(duration_s / tick_s)
    t = np.arange(n) * tick_s
    in_burst = ((t - first_at_s) % every_s < burst_len_s) & (t >= first_at_s)
    rates = np.where(in_burst, burst_rate, base_rate).astype(np.float64)
    return Trace("burst", tick_s, _integerise(rates, tick_s, None))


def from_csv(path: Path, tick_s: float = 10.0) -> Trace:
    """A trace file: CSV rows `t_s,rate` (seconds from start, images/s).

    The rate holds until the next row (a step function); the last row holds for
    one tick. A header row is allowed.
    """
    points: list[tuple[float, float]] = []
    with path.open(newline="") as fh:
        for row in csv.reader(fh):
            if not row or row[0].strip().startswith("#"):
                continue
            try:
                points.append((float(row[0]), float(row[1])))
            except (ValueError, IndexError):
                if points:  # only the first line may be a header
                    raise ValueError(f"{path}: bad row {row!r} (want t_s,rate)") from None
    if not points:
        raise ValueError(f"{path}: no `t_s,rate` rows")
    points.sort()
    times = np.array([p[0] for p in points])
    values = np.array([p[1] for p in points])
    n = max(1, math.ceil((times[-1] - times[0]) / tick_s) + 1)
    t = times[0] + np.arange(n) * tick_s
    idx = np.searchsorted(times, t, side="right") - 1
    return Trace(path.stem, tick_s, _integerise(values[idx], tick_s, None))


def load(spec: str, tick_s: float = 10.0) -> Trace:
    """`diurnal`, `burst`, or a path to a CSV trace file."""
    if spec == "diurnal":
        return diurnal(tick_s=tick_s)
    if spec == "burst":
        return burst(tick_s=tick_s)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"trace {spec!r} is neither 'diurnal', 'burst' nor a readable file")
    return from_csv(path, tick_s=tick_s)
