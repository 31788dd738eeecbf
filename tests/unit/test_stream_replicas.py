"""spec.nats.streamReplicas: the CRD's bounds and default, and the streams the
operator ensures from it (every stage's stream at that many replicas)."""

from __future__ import annotations

import copy

import pytest
from tagpipe_common.subjects import Stage
from tagpipe_operator.reconcile import Runtime, stream_policy
from tagpipe_operator.settings import OperatorSettings
from tagpipe_operator.spec import parse_spec

from tests.unit.test_crd import SAMPLE, SCHEMA, errors, names_field


def _with_replicas(n: int | None) -> dict:  # type: ignore[type-arg]
    obj = copy.deepcopy(SAMPLE)
    if n is None:
        obj["spec"]["nats"].pop("streamReplicas", None)
    else:
        obj["spec"]["nats"]["streamReplicas"] = n
    return obj


def test_the_crd_defaults_to_one_replica() -> None:
    nats = SCHEMA["properties"]["spec"]["properties"]["nats"]["properties"]
    assert nats["streamReplicas"]["default"] == 1
    assert parse_spec(_with_replicas(None)["spec"]).nats.stream_replicas == 1


@pytest.mark.parametrize("bad", [0, 6, "3"])
def test_the_crd_refuses_a_replica_count_out_of_range(bad: object) -> None:
    errs = errors(_with_replicas(bad))  # type: ignore[arg-type]
    assert errs and all(names_field(e, "streamReplicas") for e in errs), errs


@pytest.mark.parametrize("n", [1, 3])
def test_every_stream_is_ensured_at_the_spec_s_replicas(n: int) -> None:
    rt = Runtime(settings=OperatorSettings())
    policy = stream_policy(rt, parse_spec(_with_replicas(n)["spec"]))
    assert {policy.stream_config(stage).num_replicas for stage in Stage} == {n}
