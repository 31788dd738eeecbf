"""Partitions as pure functions: names (one place, partition 0 unchanged), the
item -> partition hash, each partition's consumer limits, the stream policy's
configs, and `tagpipe plan`'s recommended partitions from measured costs."""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from pathlib import Path

import pytest
from tagpipe_cli import partitionplan
from tagpipe_cli.__main__ import build_parser
from tagpipe_cli.streamplan import StageFlow
from tagpipe_common.flowlimits import (
    HEADROOM,
    MAX_PER_CONSUMER,
    PARTITION_SKEW,
    StreamLoad,
    consumer_limits,
    partitions_needed,
)
from tagpipe_common.settings import CommonSettings
from tagpipe_common.streams import StreamPolicy
from tagpipe_common.subjects import LANES, Lane, Stage, partition_names, partition_of, stage_names

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_one_partition_keeps_todays_names() -> None:
    for stage in Stage:
        assert partition_names(stage, "tagpipe", 1) == [stage_names(stage, "tagpipe")]
    policy = StreamPolicy()
    cfg = policy.stream_config(Stage.DOWNLOAD)
    assert cfg.name == "TAGPIPE_DOWNLOAD"
    assert cfg.subjects == ["tagpipe.download.realtime", "tagpipe.download.bulk"]
    consumer = policy.consumer_config(Stage.INFER, Lane.REALTIME)
    assert consumer.durable_name == "tagpipe_infer-realtime"
    assert consumer.filter_subject == "tagpipe.infer.realtime"


def test_partitions_have_their_own_streams_subjects_and_consumers() -> None:
    names = partition_names(Stage.INFER, "pipe-a", 3)
    assert [n.stream for n in names] == ["PIPE-A_INFER", "PIPE-A_INFER_P1", "PIPE-A_INFER_P2"]
    assert names[2].subject(Lane.BULK) == "pipe-a.infer.p2.bulk"
    assert names[1].consumer(Lane.REALTIME) == "pipe-a_infer_p1-realtime"
    # No subject is claimed by two streams (JetStream refuses overlapping streams).
    subjects = [s for n in names for s in n.subjects]
    assert len(subjects) == len(set(subjects)) == 3 * len(LANES)
    policy = StreamPolicy(prefix="pipe-a", partitions=3)
    assert policy.stream_config(Stage.INFER, 2).name == "PIPE-A_INFER_P2"
    assert (
        policy.consumer_config(Stage.INFER, Lane.BULK, 1).filter_subject == "pipe-a.infer.p1.bulk"
    )


def test_the_partition_count_is_a_setting() -> None:
    assert CommonSettings().partitions == 1
    assert StreamPolicy.from_settings(CommonSettings(partitions=4)).partitions == 4
    with pytest.raises(ValueError):
        CommonSettings(partitions=0)
    with pytest.raises(ValueError, match=">= 1"):
        partition_names(Stage.DOWNLOAD, "tagpipe", 0)


def test_an_item_always_hashes_to_the_same_partition() -> None:
    # crc32, not Python's salted hash: every process and every republish agrees.
    assert partition_of("0" * 32, 3) == 0xA0F292D0 % 3
    assert partition_of("anything", 1) == 0
    ids = [uuid.uuid4().hex for _ in range(3000)]
    spread = Counter(partition_of(i, 3) for i in ids)
    assert set(spread) == {0, 1, 2}
    assert min(spread.values()) > 850  # about 1,000 each
    assert all(partition_of(i, 3) == partition_of(i, 3) for i in ids[:50])


def test_each_partition_consumer_holds_a_share_with_skew() -> None:
    one = consumer_limits(400, 32)
    assert (one.max_ack_pending, one.partitions) == (16_000, 1)
    three = consumer_limits(400, 32, partitions=3)
    assert three.partitions == 3
    assert three.max_ack_pending == math.ceil(math.ceil(16_000 / 3) * PARTITION_SKEW)
    assert 3 * three.max_ack_pending >= HEADROOM * 400 * 32


def test_partitions_needed_follow_max_per_consumer() -> None:
    assert partitions_needed(400, 32) == 1
    assert partitions_needed(1000, 1024) == math.ceil(1.25 * 1000 * 1024 / MAX_PER_CONSUMER)
    enough = consumer_limits(1000, 1024, partitions=13)
    assert enough.max_ack_pending <= MAX_PER_CONSUMER
    assert 13 * enough.max_ack_pending >= 1.25 * 1000 * 1024


def flow(stage: str, msgs_per_s: float, replicas: int = 3, consumer_parts: int = 1) -> StageFlow:
    load = StreamLoad(f"S_{stage.upper()}", msgs_per_s, 1000, replicas)
    limits = consumer_limits(1, 1, partitions=consumer_parts)
    return StageFlow(stage, 1, 1, limits, load)


def test_plan_partitions_from_the_busiest_server_the_rate_and_the_consumers() -> None:
    cost = partitionplan.StreamCost(us_per_msg=1000.0, busiest_share=0.5, source="test")
    # 6,000 msgs/s x 1 ms = 6 cores, the busiest server 3: 3 partitions at 1 core each.
    a = partitionplan.advise(flow("infer", 6000.0), cost, budget_cores=1.0)
    assert (a.cores, a.busiest_cores, a.by_cpu, a.by_rate) == (6.0, 3.0, 3, 1)
    assert a.partitions == 3
    assert partitionplan.advise(flow("infer", 6000.0), cost, budget_cores=2.0).partitions == 2
    # Cheap messages at a high rate: R3 streams stay under R3_MSGS_PER_S each.
    cheap = partitionplan.StreamCost(1.0, 0.5, "test")
    fast = partitionplan.advise(flow("download", 20_000.0), cheap, 1.0)
    assert fast.by_rate == math.ceil(20_000 / partitionplan.R3_MSGS_PER_S) == fast.partitions
    assert partitionplan.advise(flow("download", 20_000.0, replicas=1), cheap, 1.0).by_rate == 1
    # A stage whose consumers need partitions gets at least those.
    held = partitionplan.advise(flow("download", 10.0, consumer_parts=5), cheap, 1.0)
    assert held.partitions == 5
    with pytest.raises(ValueError, match="positive"):
        partitionplan.advise(flow("infer", 1.0), cost, 0.0)


def test_plan_costs_come_from_bench_streams() -> None:
    r3 = partitionplan.stream_costs(RESULTS, 3)
    rows = json.loads((RESULTS / "streams.json").read_text())["rows"]
    raw = next(r for r in rows if r["replicas"] == 3 and r["message"] == "infer-raw")
    assert r3["infer-raw"].us_per_msg == raw["server_cpu_us_per_msg"]
    assert 0.33 <= r3["infer-raw"].busiest_share <= 1.0
    assert partitionplan.stream_costs(RESULTS, 1)["download-task"].busiest_share == 1.0


def run_plan(*argv: str) -> int:
    args = build_parser().parse_args(["plan", "--results-dir", str(RESULTS), *argv])
    code: int = args.func(args)
    return code


def test_plan_recommends_partitions(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_plan("--rate", "6250", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    for sc in out["scenarios"]:
        parts = sc["partitions"]
        by_stream = {s["stream"]: s for s in parts["streams"]}
        infer = by_stream["TAGPIPE_INFER"]
        # The raw hop at R3 is the costly stream (docs/benchmarks.md: about 7).
        assert infer["by_cpu"] == math.ceil(infer["busiest_cores"] - 1e-9) >= 2
        assert parts["recommended"] == max(s["partitions"] for s in parts["streams"])
        assert parts["nats_cores_per_node"] == 1.0 and parts["nats_servers"] >= 3
    assert run_plan("--rate", "6250", "--json", "--nats-cores-per-node", "4") == 0
    roomy = json.loads(capsys.readouterr().out)["scenarios"][0]["partitions"]
    assert roomy["recommended"] < out["scenarios"][0]["partitions"]["recommended"]
    assert run_plan("--rate", "6250") == 0
    text = capsys.readouterr().out
    assert "partitions per stage" in text and "spec.nats.partitions:" in text
