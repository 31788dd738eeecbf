"""Frame checks and result building (pure functions, no servers)."""

from __future__ import annotations

import numpy as np
from tagpipe_common.errors import ErrorCode
from tagpipe_common.messages import InferenceTask, StageTimings, Tag
from tagpipe_common.subjects import Lane
from tagpipe_inference.items import Decoded, Rejected, decode, error_result, ok_result, stack

CROP = 8


def task(shape: tuple[int, int, int] = (CROP, CROP, 3), nbytes: int | None = None) -> InferenceTask:
    h, w, c = shape
    n = h * w * c if nbytes is None else nbytes
    return InferenceTask(
        item_id="i1",
        job_id="j1",
        lane=Lane.BULK,
        shape=shape,
        pixels=bytes(range(256)) * (n // 256) + bytes(n % 256),
        source="https://example.test/a.jpg",
        submitted_at=100.0,
        enqueued_at=101.0,
        timings=StageTimings(download_ms=12.0),
    )


def test_a_good_frame_decodes_to_hwc_pixels() -> None:
    t = task()
    d = decode(t.to_wire(), CROP)
    assert isinstance(d, Decoded)
    assert d.pixels.shape == (CROP, CROP, 3)
    assert d.pixels.tobytes() == t.pixels
    batch = stack([d, d])
    assert batch.shape == (2, CROP, CROP, 3) and batch.dtype == np.uint8


def test_short_pixels_are_rejected_with_the_owner_known() -> None:
    d = decode(task(nbytes=CROP * CROP * 3 - 1).to_wire(), CROP)
    assert isinstance(d, Rejected)
    assert d.ref is not None and d.ref.item_id == "i1"
    assert "pixel bytes" in d.reason


def test_a_shape_other_than_the_crop_is_rejected() -> None:
    d = decode(task(shape=(CROP, CROP + 1, 3)).to_wire(), CROP)
    assert isinstance(d, Rejected) and "this model takes" in d.reason


def test_garbage_is_rejected_without_an_owner() -> None:
    d = decode(b"not a frame at all", CROP)
    assert isinstance(d, Rejected) and d.ref is None


def test_a_bad_header_still_yields_the_owner_when_routing_fields_parse() -> None:
    good = task().to_wire()
    # Corrupt the tensor shape inside the JSON header but keep the routing fields.
    broken = good.replace(b'"shape":[8,8,3]', b'"shape":"eight"')
    assert broken != good
    d = decode(broken, CROP)
    assert isinstance(d, Rejected)
    assert d.ref is not None and d.ref.job_id == "j1"


def test_ok_result_carries_timings_and_model() -> None:
    t = task()
    tags = [Tag(label="tabby cat", score=0.9, class_id=281)]
    r = ok_result(
        t, tags, model="m", version="1", fetched_at=101.5, inference_ms=7.25, finished_at=102.0
    )
    assert r.status == "ok" and r.tags == tags
    assert (r.model, r.model_version, r.source) == ("m", "1", t.source)
    assert r.timings.download_ms == 12.0  # upstream stages are kept
    assert r.timings.infer_queue_ms == 500.0
    assert r.timings.inference_ms == 7.25
    assert r.timings.end_to_end_ms == 2000.0
    assert (r.item_id, r.job_id, r.lane) == ("i1", "j1", Lane.BULK)


def test_error_result_has_a_stable_code() -> None:
    r = error_result(task(), ErrorCode.BAD_TENSOR, "short", finished_at=103.0)
    assert r.status == "error" and r.code == "bad_tensor" and r.message == "short"
    assert r.tags == [] and r.timings.end_to_end_ms == 3000.0
