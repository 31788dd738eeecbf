"""The advisory stream's names and configuration, and reading advisories and
half-readable messages (advisories.py, stranded.py): pure functions, no servers."""

from __future__ import annotations

import json

import pytest
from tagpipe_common.advisories import (
    ADVISORY_TYPE,
    MaxDeliveries,
    advisory_consumer,
    advisory_consumer_config,
    advisory_stream,
    advisory_stream_config,
    stage_advisory_subjects,
)
from tagpipe_common.messages import InferenceTask
from tagpipe_common.settings import MAX_PARTITIONS
from tagpipe_common.stranded import loose_ref
from tagpipe_common.streams import StreamPolicy
from tagpipe_common.subjects import Lane, Stage

PREFIX = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def advisory(**over: object) -> bytes:
    doc = {
        "type": ADVISORY_TYPE,
        "id": "x",
        "timestamp": "2026-12-06T06:56:53Z",
        "stream": "TAGPIPE_DOWNLOAD",
        "consumer": "tagpipe_download-bulk",
        "stream_seq": 42,
        "deliveries": 5,
        **over,
    }
    return json.dumps(doc).encode()


def test_an_advisory_is_read() -> None:
    got = MaxDeliveries.parse(advisory())
    assert got == MaxDeliveries("TAGPIPE_DOWNLOAD", "tagpipe_download-bulk", 42, 5)


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[1, 2]",
        advisory(type="io.nats.jetstream.advisory.v1.terminated"),
        advisory(stream_seq="many"),
        json.dumps({"type": ADVISORY_TYPE, "stream": "S"}).encode(),
    ],
)
def test_anything_else_is_none(data: bytes) -> None:
    assert MaxDeliveries.parse(data) is None


def test_names_follow_the_prefix() -> None:
    assert advisory_stream("tagpipe") == "TAGPIPE_ADVISORIES"
    assert advisory_consumer("tagpipe", Stage.INFER) == "tagpipe_advisories-infer"
    assert advisory_stream("blue-green") == "BLUE-GREEN_ADVISORIES"


def test_every_partition_of_each_stage_is_covered_whatever_the_count() -> None:
    subjects = stage_advisory_subjects(Stage.DOWNLOAD, "tagpipe")
    assert len(subjects) == MAX_PARTITIONS
    assert subjects[0] == f"{PREFIX}.TAGPIPE_DOWNLOAD.*"
    assert subjects[1] == f"{PREFIX}.TAGPIPE_DOWNLOAD_P1.*"
    one, many = StreamPolicy(partitions=1), StreamPolicy(partitions=8)
    assert advisory_stream_config(one).subjects == advisory_stream_config(many).subjects


def test_stream_and_consumers_are_set_on_purpose() -> None:
    policy = StreamPolicy(prefix="tagpipe", replicas=3)
    cfg = advisory_stream_config(policy)
    assert cfg.num_replicas == 3
    assert cfg.max_age and cfg.max_msgs and cfg.max_bytes  # bounded
    assert len(cfg.subjects or []) == 2 * MAX_PARTITIONS
    infer = advisory_consumer_config(policy, Stage.INFER)
    assert infer.filter_subjects == stage_advisory_subjects(Stage.INFER, "tagpipe")
    assert infer.max_deliver == -1  # never given up: that would strand the item again
    download = set(advisory_consumer_config(policy, Stage.DOWNLOAD).filter_subjects or [])
    assert not download & set(infer.filter_subjects or [])


def test_loose_ref_reads_the_owner_of_a_half_readable_message() -> None:
    body = json.dumps({"item_id": "i", "job_id": "j", "seq": 3, "v": 99}).encode()
    ref = loose_ref(body)
    assert ref is not None and (ref.item_id, ref.job_id, ref.seq) == ("i", "j", 3)
    # An inference frame whose header names an encoding this build does not know.
    frame = InferenceTask(item_id="f", request_id="r", lane=Lane.REALTIME, shape=(1, 1, 3))
    frame.pixels = b"{\xff\x00"
    wire = frame.to_wire().replace(b'"encoding":"raw"', b'"encoding":"new"')
    with pytest.raises(ValueError):
        InferenceTask.from_wire(wire)
    ref = loose_ref(wire)
    assert ref is not None and (ref.item_id, ref.request_id) == ("f", "r")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x01", b"{broken", json.dumps({"item_id": "no-owner"}).encode()],
)
def test_loose_ref_is_none_without_an_item_and_its_owner(data: bytes) -> None:
    assert loose_ref(data) is None
