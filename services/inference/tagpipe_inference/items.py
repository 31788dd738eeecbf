"""Turning JetStream messages into model input, and model output into results.

Pure functions (no I/O), so every rule about what a well-formed item is and what
its result looks like can be tested without servers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError
from tagpipe_common.errors import ErrorCode
from tagpipe_common.messages import (
    InferenceTask,
    ItemRef,
    MessageDecodeError,
    SchemaVersionError,
    StageTimings,
    Tag,
    TagResult,
)

_FRAME = struct.Struct(">4sI")


_NO_PIXELS = np.empty((0, 0, 3), dtype=np.uint8)


@dataclass
class Decoded:
    """A well-formed task and its pixels as an HWC uint8 view (empty until a
    compressed payload is decoded: see `needs_decode`)."""

    task: InferenceTask
    pixels: npt.NDArray[np.uint8]

    @property
    def needs_decode(self) -> bool:
        return self.task.encoding != "raw" and self.pixels.size == 0


@dataclass
class Rejected:
    """A message that can never be inferred. `ref` is None when not even its owner is known."""

    ref: ItemRef | None
    reason: str
    code: ErrorCode = ErrorCode.BAD_TENSOR


def _salvage_ref(data: bytes) -> ItemRef | None:
    """Best effort: the routing fields of a frame whose body is unusable."""
    try:
        _, hlen = _FRAME.unpack_from(data)
        header = json.loads(data[_FRAME.size : _FRAME.size + hlen])
        return ItemRef.model_validate(header)
    except (struct.error, ValueError, ValidationError, TypeError):
        return None


def decode(data: bytes, crop: int) -> Decoded | Rejected:
    """Check a frame against the model's crop size; never raises."""
    try:
        task = InferenceTask.from_wire(data)
    except (MessageDecodeError, SchemaVersionError) as exc:
        return Rejected(_salvage_ref(data), f"undecodable inference frame: {exc}")
    if task.encoding != "raw":
        return _compressed(task, crop)
    if task.shape != (crop, crop, 3):
        return Rejected(task, f"tensor shape {task.shape}, this model takes ({crop}, {crop}, 3)")
    if len(task.pixels) != task.expected_nbytes():
        need = task.expected_nbytes()
        return Rejected(task, f"{len(task.pixels)} pixel bytes, shape {task.shape} needs {need}")
    pixels = np.frombuffer(task.pixels, dtype=np.uint8).reshape(task.shape)
    return Decoded(task, pixels)


def _compressed(task: InferenceTask, crop: int) -> Decoded | Rejected:
    """A compressed frame, checked before decoding; the worker's decoder fills its pixels."""
    if task.encoding == "encoded_crop" and task.shape != (crop, crop, 3):
        return Rejected(task, f"crop shape {task.shape}, this model takes ({crop}, {crop}, 3)")
    if task.shape[2] != 3 or min(task.shape) < 1:
        return Rejected(task, f"image shape {task.shape} is not (height, width, 3)")
    if not task.pixels:
        return Rejected(task, f"{task.encoding} frame without a payload")
    return Decoded(task, _NO_PIXELS)


def stack(items: list[Decoded]) -> npt.NDArray[np.uint8]:
    """One contiguous NHWC batch (a single copy per image)."""
    h, w, c = items[0].pixels.shape  # decoded crops: a compressed task's shape is its source
    out = np.empty((len(items), h, w, c), dtype=np.uint8)
    for i, item in enumerate(items):
        out[i] = item.pixels
    return out


def ms_since(t0: float, t1: float) -> float:
    return round(max(0.0, (t1 - t0) * 1000.0), 3)


def ok_result(
    task: InferenceTask,
    tags: list[Tag],
    *,
    model: str,
    version: str,
    fetched_at: float,
    inference_ms: float,
    finished_at: float,
) -> TagResult:
    timings = task.timings.model_copy(
        update={
            "infer_queue_ms": ms_since(task.enqueued_at, fetched_at),
            "inference_ms": round(inference_ms, 3),
            "end_to_end_ms": ms_since(task.submitted_at, finished_at),
        }
    )
    return TagResult(
        **task.ref(),
        status="ok",
        tags=tags,
        model=model,
        model_version=version,
        source=task.source,
        timings=timings,
        finished_at=finished_at,
    )


def error_result(ref: ItemRef, code: ErrorCode, message: str, finished_at: float) -> TagResult:
    timings = ref.timings if isinstance(ref, InferenceTask) else StageTimings()
    source = ref.source if isinstance(ref, InferenceTask) else None
    timings = timings.model_copy(update={"end_to_end_ms": ms_since(ref.submitted_at, finished_at)})
    result = TagResult.error(ref, code.value, message, source=source, timings=timings)
    result.finished_at = finished_at
    return result
