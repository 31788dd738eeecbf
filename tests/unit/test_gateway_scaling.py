"""The gateway scales on its own load (requests in flight), not on the pipeline's backlog.

Pure parts: the gateways' load reports summed as the operator reads them
(tagpipe_common.gatewayload), and the gateway's policy (spec.GatewaySpec) through the
same decide() as every stage. The reports' round trip through a real gateway and a real
NATS is in tests/integration/test_gateway_drain.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from tagpipe_common.gatewayload import TTL_S, LoadReport, bucket_name, total_in_flight
from tagpipe_operator.scaling import Reason, ScalingContext, decide
from tagpipe_operator.spec import GATEWAY_METRIC, map_deprecated, parse_spec

BASE: dict[str, Any] = {
    "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
    "nats": {"url": "nats://n:4222"},
    "redis": {"url": "redis://r:6379/0"},
}


def test_reports_round_trip_and_the_bucket_is_per_pipeline() -> None:
    report = LoadReport(in_flight=7, at=1000.5)
    assert LoadReport.decode(report.encode()) == report
    assert bucket_name("tagpipe") == "TAGPIPE_GATEWAY_LOAD"
    assert bucket_name("a") != bucket_name("b")


def test_in_flight_sums_the_fresh_reports_only() -> None:
    now = 5000.0
    reports = [
        LoadReport(10, now - 1),
        LoadReport(5, now - TTL_S),  # at the edge: still fresh
        LoadReport(99, now - TTL_S - 0.1),  # a gateway that stopped reporting
    ]
    assert total_in_flight(reports, now) == 15


@pytest.mark.parametrize("reports", [[], [LoadReport(3, 0.0)]], ids=["none", "all-stale"])
def test_no_fresh_report_is_unknown_not_zero(reports: list[LoadReport]) -> None:
    assert total_in_flight(reports, now=5000.0) is None


def test_an_idle_gateway_reports_zero_which_is_known() -> None:
    assert total_in_flight([LoadReport(0, 100.0)], now=101.0) == 0


def gateway_policy(autoscaling: dict[str, Any] | None = None) -> Any:
    spec = {**BASE, "gateway": {"autoscaling": autoscaling or {}}}
    return parse_spec(spec).gateway.scaling_policy()


def test_the_gateway_policy_targets_requests_in_flight() -> None:
    policy = gateway_policy({"targetInFlightPerReplica": 50})
    assert policy.target_backlog == 50 and policy.metric == GATEWAY_METRIC
    assert policy.in_flight_per_replica is None  # no rate term: no queue to drain
    assert gateway_policy().target_backlog == 32  # the CRD default
    # The workers keep scaling on their backlog.
    spec = parse_spec(BASE)
    assert spec.downloader.scaling_policy().metric == "backlog"
    assert spec.inference.scaling_policy().metric == "backlog"


def test_in_flight_drives_the_gateway_replicas() -> None:
    policy = gateway_policy({"targetInFlightPerReplica": 50, "scaleUpStabilizationSeconds": 0})
    up = decide(ScalingContext(now=100.0, backlog=260, current_replicas=2, policy=policy))
    assert (up.desired_replicas, up.reason) == (4, Reason.SCALE_UP)  # the 4-pod policy
    assert up.recommended_replicas == 6  # ceil(260 / 50)
    assert up.message.startswith("requests in flight 260 / target 50 per replica")


def test_an_unknown_load_holds_the_gateways() -> None:
    policy = gateway_policy()
    held = decide(ScalingContext(now=100.0, backlog=None, current_replicas=3, policy=policy))
    assert held.desired_replicas == 3 and held.metrics_stale
    assert held.message == "requests in flight unavailable; holding 3 replicas"


def test_a_gateway_backlog_target_is_deprecated_and_ignored() -> None:
    asked = {**BASE, "gateway": {"autoscaling": {"targetBacklogPerReplica": 500}}}
    _, found = map_deprecated(asked)
    assert [d.field for d in found] == ["spec.gateway.autoscaling.targetBacklogPerReplica"]
    assert "ignored" in found[0].message
    assert parse_spec(asked).gateway.scaling_policy().target_backlog == 32
    # The API server writes the default into every object: that is not asking for it.
    defaulted = {**BASE, "gateway": {"autoscaling": {"targetBacklogPerReplica": 2000}}}
    assert map_deprecated(defaulted)[1] == []


def test_with_no_gateway_ready_nothing_is_in_flight() -> None:
    """No report from a tier with no ready replica is a known zero (nothing serves);
    with replicas ready it is unknown and holds. The workers' backlog never is."""
    policy = gateway_policy()
    none_ready = ScalingContext(
        now=100.0, backlog=None, current_replicas=2, policy=policy, ready_replicas=0
    )
    decision = decide(none_ready)
    assert not decision.metrics_stale and decision.desired_replicas == 2
    assert decision.message.startswith("requests in flight 0 / target 32")
    some_ready = ScalingContext(
        now=100.0, backlog=None, current_replicas=2, policy=policy, ready_replicas=1
    )
    assert decide(some_ready).metrics_stale
    worker = parse_spec(BASE).downloader.scaling_policy()
    idle_workers = ScalingContext(
        now=100.0, backlog=None, current_replicas=1, policy=worker, ready_replicas=0
    )
    assert decide(idle_workers).metrics_stale
