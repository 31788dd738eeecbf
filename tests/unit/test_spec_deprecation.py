"""A removed CRD field is deprecated first: the CRD still accepts it, and the operator maps it
to its successor and says so (`spec.map_deprecated`, pure).

`maxScaleUpStep: N` (replaced by `scaleUpPolicies`) reads as one Pods policy of N per 5 s,
unless `scaleUpPolicies` was asked for, which then wins.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml
from tagpipe_operator import deprecations
from tagpipe_operator.scalelimits import PolicyType, RatePolicy, ScaleEvent, Select, up_limit
from tagpipe_operator.spec import STAGES, STEP_PERIOD_S, map_deprecated, parse_spec

from tests.tools import ROOT

CRD = yaml.safe_load((ROOT / "crds" / "tagpipelines.tagpipe.io.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
BASE: dict[str, Any] = {
    "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
    "nats": {"url": "nats://n:4222"},
    "redis": {"url": "redis://r:6379/0"},
}
# What the API server stores when scaleUpPolicies is not given: the CRD default.
SERVER_DEFAULT_UP = [
    {"type": "Pods", "value": 4, "periodSeconds": 15},
    {"type": "Percent", "value": 100, "periodSeconds": 15},
]


def with_autoscaling(stage: str, autoscaling: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(BASE), stage: {"autoscaling": autoscaling}}


@pytest.mark.parametrize("stage", STAGES)
def test_the_crd_still_accepts_the_old_field_marked_deprecated(stage: str) -> None:
    obj = {"apiVersion": "tagpipe.io/v1alpha1", "kind": "TagPipeline"}
    obj["spec"] = with_autoscaling(stage, {"maxScaleUpStep": 2})
    assert list(jsonschema.Draft7Validator(SCHEMA).iter_errors(obj)) == []
    field = SCHEMA["properties"]["spec"]["properties"][stage]["properties"]["autoscaling"]
    step = field["properties"]["maxScaleUpStep"]
    assert step["description"].startswith("Deprecated: use scaleUpPolicies.")
    # No default: a default would map every pipeline, asked or not.
    assert "default" not in step
    obj["spec"] = with_autoscaling(stage, {"maxScaleUpStep": 0})
    assert list(jsonschema.Draft7Validator(SCHEMA).iter_errors(obj))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("defaulted", [True, False], ids=["server-defaulted", "as-written"])
def test_max_scale_up_step_maps_to_one_pods_policy(stage: str, defaulted: bool) -> None:
    autoscaling: dict[str, Any] = {"maxScaleUpStep": 3}
    if defaulted:
        autoscaling["scaleUpPolicies"] = copy.deepcopy(SERVER_DEFAULT_UP)
    spec = with_autoscaling(stage, autoscaling)
    before = copy.deepcopy(spec)

    mapped, found = map_deprecated(spec)

    assert spec == before, "map_deprecated must not change its input"
    assert mapped[stage]["autoscaling"] == {
        "scaleUpPolicies": [{"type": "Pods", "value": 3, "periodSeconds": STEP_PERIOD_S}]
    }
    assert [d.field for d in found] == [f"spec.{stage}.autoscaling.maxScaleUpStep"]
    assert "read as scaleUpPolicies [{type: Pods, value: 3, periodSeconds: 5}]" in found[0].message
    rules = parse_spec(spec).stage(stage).scaling_policy().scale_up
    assert rules.policies == (RatePolicy(PolicyType.PODS, 3, float(STEP_PERIOD_S)),)
    assert rules.select is Select.MAX


def test_the_mapped_policy_limits_a_scale_up_as_the_old_step_did() -> None:
    rules = parse_spec(with_autoscaling("inference", {"maxScaleUpStep": 2})).inference
    up = rules.scaling_policy().scale_up
    assert up_limit(up, (), now=100.0, current=1, counted=1) == 3
    # Two added 3 s ago (within the 5 s period): nothing more until it passes.
    added = (ScaleEvent(at=97.0, change=2),)
    assert up_limit(up, added, now=100.0, current=3, counted=3) == 3
    assert up_limit(up, added, now=103.0, current=3, counted=3) == 5


def test_an_explicit_successor_wins_and_the_old_field_is_reported_ignored() -> None:
    mine = [{"type": "Percent", "value": 50, "periodSeconds": 30}]
    spec = with_autoscaling("downloader", {"maxScaleUpStep": 9, "scaleUpPolicies": mine})
    mapped, found = map_deprecated(spec)
    assert mapped["downloader"]["autoscaling"] == {"scaleUpPolicies": mine}
    assert "ignored: scaleUpPolicies is set" in found[0].message
    rules = parse_spec(spec).downloader.scaling_policy().scale_up
    assert rules.policies == (RatePolicy(PolicyType.PERCENT, 50, 30.0),)


def test_a_spec_without_deprecated_fields_maps_to_itself() -> None:
    spec = with_autoscaling("gateway", {"scaleUpPolicies": SERVER_DEFAULT_UP})
    assert map_deprecated(spec) == (spec, [])
    assert parse_spec(spec) == parse_spec(BASE)


def test_every_stage_is_reported() -> None:
    spec = {**copy.deepcopy(BASE), **{s: {"autoscaling": {"maxScaleUpStep": 1}} for s in STAGES}}
    _, found = map_deprecated(spec)
    assert sorted(d.field for d in found) == sorted(
        f"spec.{s}.autoscaling.maxScaleUpStep" for s in STAGES
    )


class Events:
    """Records what `deprecations.report` posts (the real client posts a core/v1 Event)."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, str, str]] = []

    async def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.posted.append((type_, reason, message))


async def test_the_warning_is_a_condition_always_and_an_event_when_news() -> None:
    body = {"metadata": {"name": "p", "namespace": "n"}}
    body["spec"] = with_autoscaling("inference", {"maxScaleUpStep": 2})
    events, previous = Events(), {"conditions": [{"type": "Ready", "status": "True"}]}
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True"}]}

    await deprecations.report(events, body, status, previous, "t1")

    cond = status["conditions"][-1]
    assert (cond["type"], cond["status"], cond["reason"]) == (
        "Deprecated",
        "True",
        "DeprecatedFields",
    )
    assert "spec.inference.autoscaling.maxScaleUpStep is deprecated" in cond["message"]
    assert [t for t, _, _ in events.posted] == ["Warning"]
    # The next tick: same fields, no second Event, the transition time kept.
    again: dict[str, Any] = {"conditions": []}
    await deprecations.report(events, body, again, status, "t2")
    assert len(events.posted) == 1 and again["conditions"][-1]["lastTransitionTime"] == "t1"
    # The field removed: the condition goes False, and that is no warning.
    body["spec"] = copy.deepcopy(BASE)
    cleared: dict[str, Any] = {"conditions": []}
    await deprecations.report(events, body, cleared, again, "t3")
    assert cleared["conditions"][-1]["status"] == "False" and len(events.posted) == 1
