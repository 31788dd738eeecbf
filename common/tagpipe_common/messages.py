"""Wire messages between the gateway, downloader and inference tiers.

Every model ignores unknown fields (a newer producer may add some) and carries a
schema version `v`. A version outside [MIN_SCHEMA_VERSION, SCHEMA_VERSION] is
refused with `SchemaVersionError`, never half-parsed.

Inference tasks carry image bytes. Base64 inside JSON would cost a third more
bytes on the hottest path, so they travel framed: a small magic, the JSON header
length, the JSON header, then the payload. The header's `encoding` says what the
payload is; `shape` is always the (height, width, 3) it decodes to:

- `raw` (the default, so frames without the field still parse): the model's
  uint8 HWC RGB crop, exactly height * width * 3 bytes;
- `encoded_crop`: that same crop compressed (`media_type`, e.g. image/jpeg),
  to move fewer bytes over the wire;
- `original`: the source image compressed, upright, for decoding on the GPU;
  the downloader first shrinks large photos with a DCT draft decode, so `shape`
  is small enough (a few times the crop) for a batch to fit the GPU decoder.

An inference worker of this build reads all three whatever its decode setting
(the CPU decodes what the GPU is not asked to), so downloaders and workers can
be switched in any order. A worker of an older build reads a non-raw payload as
pixels of the wrong length and answers the item with a bad_tensor error: the
item fails visibly, it is never lost.
"""

from __future__ import annotations

import struct
import time
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tagpipe_common.subjects import Lane

SCHEMA_VERSION = 1
MIN_SCHEMA_VERSION = 1

_FRAME_MAGIC = b"TPI1"
_FRAME_HEADER = struct.Struct(">4sI")


class SchemaVersionError(ValueError):
    """A message from a schema version this build cannot read."""


class MessageDecodeError(ValueError):
    """Bytes that are not a valid message of the expected type."""


def now() -> float:
    return time.time()


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)

    v: int = SCHEMA_VERSION

    @field_validator("v")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if not MIN_SCHEMA_VERSION <= v <= SCHEMA_VERSION:
            raise SchemaVersionError(
                f"schema version {v} is not supported "
                f"(this build reads {MIN_SCHEMA_VERSION}..{SCHEMA_VERSION})"
            )
        return v

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            for err in exc.errors():
                if isinstance(err.get("ctx", {}).get("error"), SchemaVersionError):
                    raise SchemaVersionError(str(err["ctx"]["error"])) from exc
            raise MessageDecodeError(f"invalid {cls.__name__}: {exc}") from exc


class TaskOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    top_k: Annotated[int, Field(ge=1, le=100)] = 5
    min_score: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class StageTimings(BaseModel):
    """Milliseconds spent in each stage; None where a stage did not run."""

    model_config = ConfigDict(extra="ignore")

    download_queue_ms: float | None = None
    connect_ms: float | None = None
    download_ms: float | None = None
    decode_ms: float | None = None
    preprocess_ms: float | None = None
    infer_queue_ms: float | None = None
    inference_ms: float | None = None
    end_to_end_ms: float | None = None


class ItemRef(WireModel):
    """Who an item belongs to. Real-time items have a request id, bulk items a job id."""

    item_id: Annotated[str, Field(min_length=1, max_length=200)]
    request_id: str | None = None
    job_id: str | None = None
    client_item_id: str | None = None
    # A manifest job's item: its position among the manifest's items (0-based), which
    # names its output shard (seq // shard size). None for every other item.
    seq: Annotated[int, Field(ge=0)] | None = None
    lane: Lane = Lane.REALTIME
    submitted_at: float = Field(default_factory=now)
    # Epoch seconds after which nobody waits for this item (real-time only; bulk
    # items have none). A stage that picks it up later skips it: deadline_exceeded.
    deadline: float | None = None

    @model_validator(mode="after")
    def _owner(self) -> Self:
        if (self.request_id is None) == (self.job_id is None):
            raise ValueError("exactly one of request_id and job_id must be set")
        return self

    def expired(self, at: float | None = None) -> bool:
        return self.deadline is not None and (now() if at is None else at) > self.deadline

    def ref(self) -> dict[str, Any]:
        """The routing fields, to copy into the next stage's message."""
        return self.model_dump(include=set(ItemRef.model_fields) - {"v"})


class DownloadTask(ItemRef):
    url: str | None = None
    blob_key: str | None = None  # uploaded bytes parked in Redis (keys.RedisKeys.blob)
    options: TaskOptions = Field(default_factory=TaskOptions)
    enqueued_at: float = Field(default_factory=now)

    @model_validator(mode="after")
    def _source(self) -> Self:
        if (self.url is None) == (self.blob_key is None):
            raise ValueError("exactly one of url and blob_key must be set")
        return self

    @property
    def source(self) -> str:
        return self.url if self.url is not None else f"upload:{self.item_id}"


Encoding = Literal["raw", "encoded_crop", "original"]


class InferenceTask(ItemRef):
    shape: tuple[int, int, int]  # height, width, channels (HWC, RGB) of the decoded payload
    dtype: Literal["uint8"] = "uint8"
    encoding: Encoding = "raw"
    media_type: str | None = None  # the compressed payload's type; None for raw
    source: str | None = None
    options: TaskOptions = Field(default_factory=TaskOptions)
    timings: StageTimings = Field(default_factory=StageTimings)
    enqueued_at: float = Field(default_factory=now)
    # sha256 of the downloaded bytes when the downloader's dedupe is on: inference
    # then remembers the tags under it (tagcache.py). None: nothing is cached.
    content_sha256: str | None = None
    pixels: bytes = Field(default=b"", exclude=True, repr=False)

    @model_validator(mode="after")
    def _media_type(self) -> Self:
        if (self.encoding == "raw") != (self.media_type is None):
            raise ValueError("a compressed payload needs its media_type; a raw one has none")
        return self

    def expected_nbytes(self) -> int:
        """Payload bytes of a raw frame (compressed frames have no fixed size)."""
        h, w, c = self.shape
        return h * w * c

    def to_wire(self) -> bytes:
        header = self.model_dump_json(exclude_none=True).encode()
        return _FRAME_HEADER.pack(_FRAME_MAGIC, len(header)) + header + self.pixels

    @classmethod
    def from_wire(cls, data: bytes) -> InferenceTask:
        if len(data) < _FRAME_HEADER.size:
            raise MessageDecodeError("inference frame shorter than its header")
        magic, hlen = _FRAME_HEADER.unpack_from(data)
        if magic != _FRAME_MAGIC or _FRAME_HEADER.size + hlen > len(data):
            raise MessageDecodeError("not an inference frame")
        start = _FRAME_HEADER.size
        task = cls.from_json(data[start : start + hlen])
        task.pixels = bytes(data[start + hlen :])
        return task


class Tag(BaseModel):
    model_config = ConfigDict(extra="ignore")

    label: str
    score: float
    class_id: int | None = None


class TagResult(ItemRef):
    status: Literal["ok", "error"]
    code: str | None = None
    message: str | None = None
    tags: list[Tag] = Field(default_factory=list)
    model: str | None = None
    model_version: str | None = None
    source: str | None = None
    timings: StageTimings = Field(default_factory=StageTimings)
    finished_at: float = Field(default_factory=now)
    cached: bool = Field(
        False,
        description="The tags `model_version` gave byte-identical content lately "
        "(tagcache.py), served without inference",
    )

    @model_validator(mode="after")
    def _error_has_code(self) -> Self:
        if self.status == "error" and not self.code:
            raise ValueError("an error result needs a code")
        return self

    @classmethod
    def error(
        cls,
        ref: ItemRef,
        code: str,
        message: str,
        *,
        source: str | None = None,
        timings: StageTimings | None = None,
    ) -> TagResult:
        return cls(
            **ref.ref(),
            status="error",
            code=code,
            message=message,
            source=source,
            timings=timings or StageTimings(),
        )
