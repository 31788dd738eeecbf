"""Contract tests: every wire message round-trips, and versions are enforced."""

from __future__ import annotations

import json

import pytest
from tagpipe_common.messages import (
    SCHEMA_VERSION,
    DownloadTask,
    InferenceTask,
    MessageDecodeError,
    SchemaVersionError,
    StageTimings,
    Tag,
    TagResult,
    TaskOptions,
)
from tagpipe_common.subjects import Lane


def download_task() -> DownloadTask:
    return DownloadTask(
        item_id="j1:7",
        job_id="j1",
        client_item_id="7",
        lane=Lane.BULK,
        url="https://example.com/a.jpg",
        options=TaskOptions(top_k=3, min_score=0.1),
    )


def inference_task() -> InferenceTask:
    return InferenceTask(
        item_id="i1",
        request_id="r1",
        shape=(2, 3, 3),
        pixels=bytes(range(18)),
        timings=StageTimings(download_ms=12.5, decode_ms=3.0),
        source="https://e/x.png",
    )


def tag_result() -> TagResult:
    return TagResult(
        item_id="i1",
        request_id="r1",
        status="ok",
        tags=[Tag(label="tabby cat", score=0.91, class_id=281)],
        model="efficientnet-lite0",
        model_version="1",
        timings=StageTimings(inference_ms=4.2),
    )


@pytest.mark.parametrize("msg", [download_task(), tag_result()], ids=["download", "result"])
def test_json_round_trip(msg: DownloadTask | TagResult) -> None:
    again = type(msg).from_json(msg.to_json())
    assert again == msg
    assert json.loads(msg.to_json())["v"] == SCHEMA_VERSION


def test_inference_frame_round_trip_keeps_pixels() -> None:
    t = inference_task()
    again = InferenceTask.from_wire(t.to_wire())
    assert again == t
    assert again.pixels == t.pixels
    assert again.expected_nbytes() == 18


def test_inference_frame_does_not_base64_pixels() -> None:
    t = inference_task().model_copy(update={"pixels": b"\x00" * 150_528})
    assert len(t.to_wire()) < 150_528 + 1024


@pytest.mark.parametrize(
    "data", [b"", b"TPI1", b"XXXX\x00\x00\x00\x02{}", b"TPI1\x00\x00\xff\xff{}"]
)
def test_garbage_frames_are_refused(data: bytes) -> None:
    with pytest.raises(MessageDecodeError):
        InferenceTask.from_wire(data)


def test_unknown_fields_are_ignored() -> None:
    original = download_task()
    doc = json.loads(original.to_json())
    doc["added_in_a_later_minor"] = {"x": 1}
    assert DownloadTask.from_json(json.dumps(doc)) == original


@pytest.mark.parametrize("version", [0, SCHEMA_VERSION + 1])
def test_unsupported_schema_versions_are_clearly_refused(version: int) -> None:
    doc = json.loads(download_task().to_json())
    doc["v"] = version
    with pytest.raises(SchemaVersionError, match=f"schema version {version} is not supported"):
        DownloadTask.from_json(json.dumps(doc))


def test_a_message_without_a_version_reads_as_the_first_schema() -> None:
    doc = json.loads(download_task().to_json())
    del doc["v"]
    assert DownloadTask.from_json(json.dumps(doc)).v == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"item_id": "a", "url": "http://x"},  # no owner
        {"item_id": "a", "request_id": "r", "job_id": "j", "url": "http://x"},  # two owners
        {"item_id": "a", "request_id": "r"},  # no source
        {"item_id": "a", "request_id": "r", "url": "http://x", "blob_key": "k"},  # two sources
        {"item_id": "", "request_id": "r", "url": "http://x"},
    ],
)
def test_invalid_download_tasks_are_refused(fields: dict[str, str]) -> None:
    with pytest.raises(MessageDecodeError):
        DownloadTask.from_json(json.dumps(fields))


def test_error_result_needs_a_code_and_keeps_routing() -> None:
    with pytest.raises(MessageDecodeError):
        TagResult.from_json(json.dumps({"item_id": "a", "request_id": "r", "status": "error"}))
    err = TagResult.error(download_task(), "http_404", "not found", source="https://e/a")
    assert (err.job_id, err.client_item_id, err.lane, err.code) == (
        "j1",
        "7",
        Lane.BULK,
        "http_404",
    )


@pytest.mark.parametrize(
    ("encoding", "media_type", "payload"),
    [
        ("encoded_crop", "image/jpeg", b"\xff\xd8\xff\xe0 a jpeg crop"),
        ("original", "image/jpeg", b"\xff\xd8\xff\xe0 a shrunk photo" * 100),
        ("original", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
    ],
)
def test_compressed_frames_round_trip(encoding: str, media_type: str, payload: bytes) -> None:
    t = inference_task().model_copy(
        update={"encoding": encoding, "media_type": media_type, "pixels": payload}
    )
    again = InferenceTask.from_wire(t.to_wire())
    assert again == t
    assert (again.encoding, again.media_type, again.pixels) == (encoding, media_type, payload)
    assert again.shape == (2, 3, 3)  # what it decodes to, whatever the payload's size


def test_a_frame_without_encoding_reads_as_raw() -> None:
    # Frames written before the field existed carry no `encoding` key.
    t = inference_task()
    header = json.loads(t.to_json())
    header.pop("encoding", None)
    old = InferenceTask.model_validate(header)
    assert old.encoding == "raw"
    assert old.media_type is None


@pytest.mark.parametrize(
    "fields",
    [
        {"encoding": "original"},  # compressed, no media type
        {"encoding": "raw", "media_type": "image/jpeg"},  # raw with one
        {"encoding": "webp_tiles", "media_type": "image/webp"},  # unknown encoding
    ],
)
def test_inconsistent_encodings_are_refused(fields: dict[str, str]) -> None:
    header = json.loads(inference_task().to_json()) | fields
    body = json.dumps(header).encode()
    frame = b"TPI1" + len(body).to_bytes(4, "big") + body + b"x"
    with pytest.raises(MessageDecodeError):
        InferenceTask.from_wire(frame)
