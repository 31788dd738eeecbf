"""The CRD's own openAPIV3Schema accepts the sample and refuses bad manifests, naming the field.

This is the validation the API server does on `kubectl apply`; kmock does none,
so it is tested here, against the schema file itself.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from tagpipe_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "tagpipelines.tagpipe.io.yaml").read_text())
SAMPLE = yaml.safe_load((ROOT / "crds" / "examples" / "tagpipeline.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def errors(obj: dict[str, Any]) -> list[jsonschema.ValidationError]:
    # The x-kubernetes-* keywords are unknown to jsonschema and ignored, as intended.
    return list(jsonschema.Draft7Validator(SCHEMA).iter_errors(obj))


def names_field(err: jsonschema.ValidationError, field: str) -> bool:
    return field in [str(p) for p in err.absolute_path] or repr(field) in err.message


def test_crd_identity() -> None:
    assert CRD["metadata"]["name"] == "tagpipelines.tagpipe.io"
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "TagPipeline",
        "tagpipelines",
        ["tp"],
    )
    assert CRD["spec"]["scope"] == "Namespaced"
    assert VERSION["name"] == "v1alpha1" and VERSION["subresources"] == {"status": {}}
    assert SCHEMA["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
    cols = [c["name"] for c in VERSION["additionalPrinterColumns"]]
    assert cols == ["Ready", "Backlog", "Downloaders", "Inference", "Age"]


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for key, child in node.get("properties", {}).items():
        out += _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    return out


def test_schema_is_structural_without_cel() -> None:
    for path, node in _walk(SCHEMA):
        assert "type" in node, f"{path} has no type (not structural)"
        assert "x-kubernetes-validations" not in node, f"{path} uses CEL (needs k8s 1.25+)"
        for branch in node.get("oneOf", []):
            assert set(branch) <= {"required"}, f"{path}: oneOf may only constrain"


def test_sample_validates() -> None:
    assert errors(SAMPLE) == []


def _with(path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(SAMPLE)
    *parents, leaf = path.split(".")
    node = obj
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return obj


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("spec.model", _DELETE, "model"),
        ("spec.nats.url", "http://nats:4222", "url"),
        ("spec.redis.url", _DELETE, "url"),
        ("spec.inference.gpu", -1, "gpu"),
        ("spec.inference.gpu", "one", "gpu"),
        ("spec.deletionPolicy", "Keep", "deletionPolicy"),
        ("spec.gateway.service.type", "Ingress", "type"),
        ("spec.gateway.service.port", 70000, "port"),
        ("spec.downloader.replicas.min", -1, "min"),
        ("spec.downloader.autoscaling.targetBacklogPerReplica", 0, "targetBacklogPerReplica"),
        ("spec.downloader.autoscaling.scaleUpPolicies", [{"type": "Pods", "value": 0}], "value"),
        ("spec.downloader.autoscaling.scaleUpPolicies", [{"type": "Step", "value": 4}], "type"),
        ("spec.downloader.autoscaling.scaleDownPolicies", [{"value": 10}], "type"),
        ("spec.downloader.autoscaling.scaleUpSelectPolicy", "Sum", "scaleUpSelectPolicy"),
        ("spec.downloader.autoscaling.targetUtilization", 1.5, "targetUtilization"),
        ("spec.inference.autoscaling.targetUtilization", 0, "targetUtilization"),
        ("spec.downloader.autoscaling.backlogDrainSeconds", 0, "backlogDrainSeconds"),
        ("spec.downloader.autoscaling.rateWindowSeconds", 1, "rateWindowSeconds"),
        ("spec.downloader.autoscaling.tolerance", 0.9, "tolerance"),
        ("spec.inference.autoscaling.tolerance", -0.1, "tolerance"),
        ("spec.inference.batching.maxBatch", 0, "maxBatch"),
        ("spec.inference.imagePullPolicy", "Sometimes", "imagePullPolicy"),
        ("spec.nats.prefix", "Bad_Prefix", "prefix"),
        ("spec.model.name", "Not A Name", "name"),
        ("spec.model.storageUri", "ftp://bucket/model", "storageUri"),
        ("spec.model.storageUri", "s3://Bad_Bucket/model", "storageUri"),
        ("spec.model.sha256", "E1" * 32, "sha256"),
        ("spec.model.storageSecretRef", {}, "name"),
        ("spec.gateway.apiKeySecretRef", {"key": "k"}, "name"),
    ],
)
def test_invalid_manifest_is_refused_naming_the_field(path: str, value: Any, field: str) -> None:
    errs = errors(_with(path, value))
    assert errs, f"{path}={value!r} was accepted"
    assert any(names_field(e, field) for e in errs), [e.message for e in errs]


def test_model_needs_a_source() -> None:
    obj = _with("spec.model.storageUri", _DELETE)
    assert errors(obj), "a model with neither storageUri nor volume was accepted"
    obj["spec"]["model"]["volume"] = {"persistentVolumeClaim": {"claimName": "m"}}
    assert errors(obj) == []


@pytest.mark.parametrize(
    ("uri", "pinned", "ok"),
    [
        ("s3://models/efficientnet-lite0", False, True),
        ("https://models.example.com/m/", True, True),
        ("https://models.example.com/m/", False, False),  # https needs the sha256 pin
        ("pvc://models/m", False, True),
    ],
)
def test_storage_uri_schemes(uri: str, pinned: bool, ok: bool) -> None:
    obj = _with("spec.model.storageUri", uri)
    if pinned:
        obj["spec"]["model"]["sha256"] = "e1" * 32
    assert (errors(obj) == []) is ok, [e.message for e in errors(obj)]


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural defaulting as the API server does it (defaults, then recurse)."""
    if not isinstance(obj, dict):
        return obj
    for key, sub in schema.get("properties", {}).items():
        if key not in obj and "default" in sub:
            obj[key] = copy.deepcopy(sub["default"])
        if key in obj:
            obj[key] = apply_defaults(sub, obj[key])
    return obj


@pytest.mark.parametrize(
    "partial",
    [
        {},
        {"gateway": {"replicas": {"max": 3}}, "inference": {"autoscaling": {"scaleToZero": True}}},
    ],
)
def test_operator_defaults_match_the_crd(partial: dict[str, Any]) -> None:
    minimal = {
        "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
        "nats": {"url": "nats://n:4222"},
        "redis": {"url": "redis://r:6379/0"},
        **partial,
    }
    defaulted = apply_defaults(SCHEMA["properties"]["spec"], copy.deepcopy(minimal))
    assert errors({"spec": defaulted}) == []
    ours = parse_spec(minimal).model_dump(by_alias=True, exclude_none=True)
    for stage in ("gateway", "downloader", "inference"):
        ours[stage].pop("env")  # a list default the CRD leaves absent
        ours[stage].pop("image")  # compared below: image defaults are per stage
    ours["gateway"]["autoscaling"].pop("scaleToZero")  # the gateway never sleeps
    for rate_field in (
        "targetUtilization",
        "backlogDrainSeconds",
        "rateWindowSeconds",
        "backlogFloor",
    ):
        ours["gateway"]["autoscaling"].pop(rate_field)  # the gateway scales on backlog only
    for stage in ("gateway", "downloader", "inference"):
        assert defaulted[stage].pop("image") == parse_spec(minimal).stage(stage).image
    assert ours == defaulted


def test_redis_takes_one_server_or_a_sentinel_set() -> None:
    sentinel = "redis+sentinel://s0:26379,s1:26379,s2:26379/tagpipe/0"
    assert errors(_with("spec.redis.url", sentinel)) == []
    assert errors(_with("spec.redis.waitReplicas", 1)) == []
    assert errors(_with("spec.redis.url", "sentinel://s0:26379/tagpipe"))
    assert any(names_field(e, "waitReplicas") for e in errors(_with("spec.redis.waitReplicas", -1)))
