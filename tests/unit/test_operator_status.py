"""build_status(): conditions and per-stage status from one tick's observations."""

from __future__ import annotations

from typing import Any

from tagpipe_operator.children import Failure
from tagpipe_operator.scaling import Reason, ScalingDecision, ScalingState
from tagpipe_operator.status import StageObservation, build_status


def decision(current: int, desired: int, **flags: bool) -> ScalingDecision:
    return ScalingDecision(
        desired_replicas=desired,
        reason=Reason.STEADY,
        message="m",
        state=ScalingState(),
        current_replicas=current,
        **flags,
    )


def observe(**overrides: Any) -> list[StageObservation]:
    base = {
        "gateway": StageObservation("gateway", 30, decision(2, 2), 2),
        "downloader": StageObservation("downloader", 20, decision(1, 1), 1),
        "inference": StageObservation("inference", 10, decision(1, 1), 1),
    }
    base.update(overrides)
    return list(base.values())


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_healthy_pipeline() -> None:
    st = build_status(3, observe(), {}, "T1")
    assert conditions(st) == {
        "Ready": "True",
        "Degraded": "False",
        "ScalingLimited": "False",
        "MetricsStale": "False",
        "Conflict": "False",
    }
    assert st["observedGeneration"] == 3 and st["backlog"] == 30
    assert st["downloaders"] == "1/1" and st["inference"] == "1/1"
    assert st["stages"]["inference"] == {
        "desiredReplicas": 1,
        "currentReplicas": 1,
        "readyReplicas": 1,
        "backlog": 10,
        "lastScaleTime": None,
    }


def test_scaling_up_not_ready_yet_is_degraded_but_ready() -> None:
    st = build_status(
        1,
        observe(
            inference=StageObservation("inference", 500, decision(1, 5, scaling_limited=True), 1)
        ),
        {},
        "T1",
    )
    c = conditions(st)
    assert c["Ready"] == "True" and c["Degraded"] == "True" and c["ScalingLimited"] == "True"
    assert st["stages"]["inference"]["lastScaleTime"] == "T1"
    assert st["inference"] == "1/5"


def test_asleep_stage_is_still_ready() -> None:
    st = build_status(
        1, observe(downloader=StageObservation("downloader", 0, decision(0, 0), 0)), {}, "T1"
    )
    assert conditions(st)["Ready"] == "True"


def test_missing_deployment_and_stale_metrics() -> None:
    obs = observe(
        inference=StageObservation("inference", None, None, 0),
        downloader=StageObservation("downloader", None, decision(2, 2, metrics_stale=True), 2),
    )
    st = build_status(1, obs, {}, "T1", recreated=["Deployment/tp-inference"])
    c = conditions(st)
    assert c == {
        "Ready": "False",
        "Degraded": "True",
        "ScalingLimited": "False",
        "MetricsStale": "True",
        "Conflict": "False",
    }
    assert st["backlog"] is None and st["inference"] == "-"


def test_transition_time_moves_only_on_flip() -> None:
    first = build_status(1, observe(), {}, "T1")
    same = build_status(1, observe(), first, "T2")
    assert {c["lastTransitionTime"] for c in same["conditions"]} == {"T1"}
    flipped = build_status(
        1, observe(gateway=StageObservation("gateway", 0, decision(2, 2), 0)), same, "T3"
    )
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times["Ready"] == "T3" and times["MetricsStale"] == "T1"
    # lastScaleTime survives ticks without a change
    scaled = build_status(
        1, observe(inference=StageObservation("inference", 99, decision(1, 3), 1)), {}, "T4"
    )
    later = build_status(
        1, observe(inference=StageObservation("inference", 99, decision(3, 3), 3)), scaled, "T5"
    )
    assert later["stages"]["inference"]["lastScaleTime"] == "T4"


def test_unreadable_backlog_names_the_nats_and_the_reason() -> None:
    held = decision(2, 2, metrics_stale=True)
    obs = [StageObservation(s, None, held, 2) for s in ("gateway", "downloader", "inference")]
    problem = "NATS nats://127.0.0.1:4999: Connect call failed"
    stale = next(
        c
        for c in build_status(1, obs, {}, "T1", None, problem)["conditions"]
        if c["type"] == "MetricsStale"
    )
    assert stale["status"] == "True" and stale["reason"] == "NatsUnavailable"
    assert stale["message"].startswith(problem + "; holding replicas for: gateway")


def test_a_failed_apply_is_ready_false_with_the_apis_reason_naming_the_object() -> None:
    forbidden = Failure(
        "Deployment/tp-gateway", "Forbidden", "Forbidden: cannot set blockOwnerDeletion"
    )
    taken = Failure("ServiceAccount/tp-workers", "Conflict", "ServiceAccount/tp-workers exists")
    obs = observe()
    st = build_status(3, obs, {}, "T1", failures=[forbidden, taken])
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Forbidden")
    assert "Deployment/tp-gateway" in ready["message"]
    assert "ServiceAccount/tp-workers" in ready["message"]
    conflict = next(c for c in st["conditions"] if c["type"] == "Conflict")
    assert (conflict["status"], conflict["reason"]) == ("True", "NotOwned")
    assert "ServiceAccount/tp-workers" in conflict["message"]
    assert st["observedGeneration"] == 3  # the caller passes the last applied generation


def test_no_applied_generation_yet_is_none() -> None:
    assert build_status(None, observe(), {}, "T1")["observedGeneration"] is None
