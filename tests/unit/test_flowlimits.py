"""Flow-control limits follow the deployment (tagpipe_common.flowlimits) and
`tagpipe plan` prints them with each stream's peak load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tagpipe_cli.__main__ import build_parser
from tagpipe_common.flowlimits import (
    FLOOR_ACK_PENDING,
    FLOOR_WAITING,
    HEADROOM,
    MAX_PER_CONSUMER,
    check_override,
    consumer_limits,
)

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def plan(*argv: str) -> int:
    args = build_parser().parse_args(["plan", "--results-dir", str(RESULTS), *argv])
    code: int = args.func(args)
    return code


def test_a_small_stage_keeps_the_old_floors() -> None:
    lim = consumer_limits(max_replicas=4, slots=32)
    assert (lim.max_ack_pending, lim.max_waiting, lim.partitions) == (
        FLOOR_ACK_PENDING,
        FLOOR_WAITING,
        1,
    )


@pytest.mark.parametrize(("replicas", "slots"), [(400, 32), (114, 32), (40, 64), (3000, 32)])
def test_limits_hold_every_slot_with_headroom(replicas: int, slots: int) -> None:
    lim = consumer_limits(replicas, slots)
    total = lim.max_ack_pending * lim.partitions
    assert total >= HEADROOM * replicas * slots
    assert lim.max_waiting * lim.partitions >= HEADROOM * replicas * slots
    assert lim.max_ack_pending <= MAX_PER_CONSUMER


def test_the_crd_maxima_get_partitions_not_a_silent_cap() -> None:
    # 1,000 replicas x 1,024 slots: the CRD's own maxima.
    lim = consumer_limits(1000, 1024)
    assert lim.partitions == math.ceil(HEADROOM * 1000 * 1024 / MAX_PER_CONSUMER) == 13
    assert lim.max_ack_pending * lim.partitions >= 1.25 * 1000 * 1024


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        consumer_limits(0, 32)


def test_a_hand_set_limit_below_the_deployment_is_refused_in_one_line() -> None:
    lim = consumer_limits(400, 32)
    msg = check_override("max_ack_pending", 1000, lim)
    assert msg is not None and "16000" in msg and "\n" not in msg
    assert check_override("max_ack_pending", 16000, lim) is None
    assert check_override("max_waiting", 100, lim) is not None


def test_plan_prints_limits_and_stream_loads(capsys: pytest.CaptureFixture[str]) -> None:
    rc = plan("--rate", "6250", "--json")
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for sc in out["scenarios"]:
        by_stage = {st["stage"]: st for st in sc["stages"]}
        dl, infer = sc["streams"]
        assert dl["load"]["msgs_per_s"] == infer["load"]["msgs_per_s"] == 6250
        replicas = by_stage["downloader"]["replicas"]
        assert dl["replicas"] == replicas
        assert dl["limits"]["max_ack_pending"] >= HEADROOM * replicas * 32
        # The raw hop is the 224x224x3 crop plus its JSON header.
        assert 150_528 < infer["load"]["msg_bytes"] < 152_000
        assert infer["replicated_bytes_per_s"] == pytest.approx(3 * infer["bytes_per_s"])


def test_plan_original_hop_reads_the_measured_size(capsys: pytest.CaptureFixture[str]) -> None:
    measured = json.loads((RESULTS / "hop-encoding.json").read_text())
    label = "small JPEGs as downloaded (hop: original)"
    median = measured["encodings"][label]["bytes_median"]
    rc = plan("--hop", "original", "--json")
    assert rc == 0
    infer = json.loads(capsys.readouterr().out)["scenarios"][0]["streams"][1]
    assert median < infer["load"]["msg_bytes"] < median + 1500
