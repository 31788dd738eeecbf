"""Flow control from one source (tagpipe_operator.flow): consumer limits follow each
stage's maxima, workers get the same max deliver and ack wait as the consumers, and a
hand-set value that contradicts the deployment is refused with a reason."""

from __future__ import annotations

from typing import Any

import pytest
from tagpipe_common.flowlimits import MAX_PER_CONSUMER
from tagpipe_common.settings import CommonSettings
from tagpipe_common.subjects import Lane, Stage
from tagpipe_operator.flow import problems, stage_limits, stream_policy
from tagpipe_operator.render import config_data
from tagpipe_operator.spec import parse_spec

MINIMAL = {
    "model": {"name": "m", "version": "1", "storageUri": "pvc://models/dir/m"},
    "nats": {"url": "nats://nats:4222"},
    "redis": {"url": "redis://redis:6379/0"},
}


def spec(**over: Any) -> Any:
    return parse_spec({**MINIMAL, **over})


def test_limits_follow_each_stage_maximum_replicas_and_slots() -> None:
    s = spec(downloader={"replicas": {"max": 400}}, inference={"replicas": {"max": 40}})
    lim = stage_limits(s)
    assert lim[Stage.DOWNLOAD].max_ack_pending == 16_000  # 1.25 x 400 x 32 slots
    assert lim[Stage.INFER].max_ack_pending == 3_200  # 1.25 x 40 x 2 batches of 32
    policy = stream_policy(CommonSettings(), s)
    cfg = policy.consumer_config(Stage.DOWNLOAD, Lane.BULK)
    assert (cfg.max_ack_pending, cfg.max_waiting) == (16_000, 16_000)


def test_a_small_pipeline_keeps_the_old_limits() -> None:
    cfg = stream_policy(CommonSettings(), spec()).consumer_config(Stage.INFER, Lane.BULK)
    assert (cfg.max_ack_pending, cfg.max_waiting) == (1000, 512)


def test_workers_and_consumers_read_one_source() -> None:
    s = spec(nats={"url": "nats://n:4222", "maxDeliver": 7, "ackWaitSeconds": 45})
    policy = stream_policy(CommonSettings(max_deliver=3, ack_wait_s=10), s)
    data = config_data(s)
    infer = policy.consumer_config(Stage.INFER, Lane.REALTIME)
    download = policy.consumer_config(Stage.DOWNLOAD, Lane.BULK)
    assert infer.max_deliver == download.max_deliver == int(data["TAGPIPE_MAX_DELIVER"]) == 7
    assert infer.ack_wait == float(data["TAGPIPE_ACK_WAIT_S"]) == 45
    assert download.ack_wait == 60  # downloads never wait less (they extend their lease)
    # The workers' own settings parse what the ConfigMap gives them to the same values.
    worker = CommonSettings.model_validate(
        {k.removeprefix("TAGPIPE_").lower(): v for k, v in data.items()}
    )
    assert (worker.max_deliver, worker.ack_wait_s) == (7, 45.0)


def test_defaults_agree_with_the_services_defaults() -> None:
    data, common = config_data(spec()), CommonSettings()
    assert int(data["TAGPIPE_MAX_DELIVER"]) == common.max_deliver
    assert float(data["TAGPIPE_ACK_WAIT_S"]) == common.ack_wait_s


@pytest.mark.parametrize("name", ["TAGPIPE_MAX_DELIVER", "TAGPIPE_ACK_WAIT_S", "TAGPIPE_PREFIX"])
def test_a_stage_env_override_of_an_agreed_setting_is_refused(name: str) -> None:
    s = spec(inference={"env": [{"name": name, "value": "9"}]})
    [reason] = problems(s, CommonSettings())
    assert reason.startswith(f"inference.env sets {name}") and "\n" not in reason


def test_other_env_is_fine() -> None:
    s = spec(downloader={"env": [{"name": "TAGPIPE_LOG_LEVEL", "value": "DEBUG"}]})
    assert problems(s, CommonSettings()) == []


def test_an_operator_max_ack_pending_below_the_maxima_is_refused_not_capped() -> None:
    s = spec(downloader={"replicas": {"max": 400}})
    [reason] = problems(s, CommonSettings(max_ack_pending=1000))
    assert "TAGPIPE_MAX_ACK_PENDING=1000" in reason and "16000" in reason
    # Above what the maxima imply it is a floor every consumer gets.
    assert problems(s, CommonSettings(max_ack_pending=20_000)) == []
    floor = stream_policy(CommonSettings(max_ack_pending=20_000), s)
    assert floor.consumer_config(Stage.DOWNLOAD, Lane.BULK).max_ack_pending == 20_000


def test_maxima_one_consumer_cannot_hold_are_refused_with_the_reason() -> None:
    # The CRD's own maxima: 1,000 replicas x 1,024 slots.
    s = spec(downloader={"replicas": {"max": 1000}, "limits": {"concurrency": 1024}})
    [reason] = problems(s, CommonSettings())
    assert reason.startswith("downloader:") and "need 13 partitions" in reason
    assert "spec.nats.partitions is 1: set it to 13 or more" in reason and "\n" not in reason


def test_enough_partitions_accept_those_maxima_with_each_consumer_holding_a_share() -> None:
    maxima = {"replicas": {"max": 1000}, "limits": {"concurrency": 1024}}
    too_few = spec(downloader=maxima, nats={"url": "nats://n:4222", "partitions": 12})
    [reason] = problems(too_few, CommonSettings())
    assert "need 13 partitions" in reason and "is 12" in reason
    s = spec(downloader=maxima, nats={"url": "nats://n:4222", "partitions": 13})
    assert problems(s, CommonSettings()) == []
    policy = stream_policy(CommonSettings(), s)
    assert policy.partitions == 13
    share = MAX_PER_CONSUMER  # ceil(1.25 x 1000 x 1024 / 13) x 1.2, capped at the maximum
    for part in range(13):
        cfg = policy.consumer_config(Stage.DOWNLOAD, Lane.BULK, part)
        assert cfg.max_ack_pending == share
        assert cfg.durable_name == policy.names(Stage.DOWNLOAD)[part].consumer(Lane.BULK)
    assert 13 * share >= 1.25 * 1000 * 1024


def test_partitions_reach_every_worker_and_the_streams_from_one_field() -> None:
    s = spec(nats={"url": "nats://n:4222", "partitions": 3})
    data = config_data(s)
    assert data["TAGPIPE_PARTITIONS"] == "3"
    worker = CommonSettings.model_validate(
        {k.removeprefix("TAGPIPE_").lower(): v for k, v in data.items()}
    )
    assert worker.partitions == stream_policy(CommonSettings(), s).partitions == 3
    bad = spec(gateway={"env": [{"name": "TAGPIPE_PARTITIONS", "value": "2"}]})
    [reason] = problems(bad, CommonSettings())
    assert reason.startswith("gateway.env sets TAGPIPE_PARTITIONS")


def test_one_partition_is_the_unpartitioned_pipeline() -> None:
    policy = stream_policy(CommonSettings(), spec())
    assert policy.partitions == 1
    assert [n.stream for n in policy.names(Stage.INFER)] == ["TAGPIPE_INFER"]
    assert config_data(spec())["TAGPIPE_PARTITIONS"] == "1"
