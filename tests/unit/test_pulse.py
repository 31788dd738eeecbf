"""A worker's pulse: rates and batch sizes over the last minute, from its own counters."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from tagpipe_common.keys import RedisKeys
from tagpipe_common.pulse import WINDOW_S, Pulse, Reading, registry_reader
from tagpipe_common.subjects import Stage


def pulse_of(readings: Iterator[Reading]) -> Pulse:
    return Pulse(None, RedisKeys("t"), Stage.INFER, lambda: next(readings))  # type: ignore[arg-type]


def test_rate_and_mean_batch_over_the_window() -> None:
    readings = iter([
        Reading(t=100.0, images=0, batches=0, batch_images=0, inflight=0),
        Reading(t=110.0, images=50, batches=5, batch_images=50, inflight=3),
        Reading(t=120.0, images=200, batches=10, batch_images=200, inflight=7),
    ])  # fmt: skip
    p = pulse_of(readings)
    assert p.fields()["images_per_s"] == "0.000"  # one reading: no span yet
    p.fields()
    f = p.fields()
    assert (f["images_per_s"], f["batch_size"], f["batches"], f["inflight"]) == (
        "10.000", "20.000", "10", "7",
    )  # fmt: skip


def test_readings_older_than_the_window_drop_out() -> None:
    t0 = 1000.0
    readings = iter([
        Reading(t0, 0, 0, 0, 0),
        Reading(t0 + WINDOW_S / 2, 1000, 10, 1000, 0),  # a burst long ago
        Reading(t0 + WINDOW_S + 1, 1000, 10, 1000, 0),
        Reading(t0 + 2 * WINDOW_S, 1000, 10, 1000, 0),  # idle for a full minute
    ])  # fmt: skip
    p = pulse_of(readings)
    for _ in range(3):
        p.fields()
    f = p.fields()
    assert (f["images_per_s"], f["batch_size"], f["batches"]) == ("0.000", "0.000", "0")


def test_registry_reader_sums_labelled_series() -> None:
    reg = CollectorRegistry()
    results = Counter("tagpipe_inference_results", "r", ["status"], registry=reg)
    sizes = Histogram("tagpipe_inference_batch_size", "b", buckets=(8, 32), registry=reg)
    inflight = Gauge("tagpipe_inference_inflight_items", "i", registry=reg)
    results.labels("ok").inc(30)
    results.labels("error").inc(2)
    sizes.observe(24)
    sizes.observe(8)
    inflight.set(5)
    r = registry_reader(Stage.INFER, reg)()
    assert (r.images, r.batches, r.batch_images, r.inflight) == (32, 2, 32, 5)
