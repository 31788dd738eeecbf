"""render(): pure manifests, checked against Kubernetes' own schemas and our rules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from tagpipe_common.settings import CommonSettings
from tagpipe_downloader.settings import DownloaderSettings
from tagpipe_gateway.settings import GatewaySettings
from tagpipe_inference.settings import InferenceSettings
from tagpipe_operator.children import without_replicas
from tagpipe_operator.render import (
    CHECKSUM_ANNOTATION,
    COMMANDS,
    config_data,
    render,
)
from tagpipe_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = yaml.safe_load((ROOT / "crds" / "examples" / "tagpipeline.yaml").read_text())["spec"]
MINIMAL = {
    "model": {"name": "m", "version": "1", "storageUri": "pvc://models/dir/m"},
    "nats": {"url": "nats://nats:4222"},
    "redis": {"url": "redis://redis:6379/0"},
}


S3_MODEL = {
    "name": "m",
    "version": "1",
    "storageUri": "s3://models/efficientnet-lite0",
    "storageSecretRef": {"name": "model-store"},
}
HTTPS_MODEL = {
    "name": "m",
    "version": "1",
    "storageUri": "https://models.example.com/efficientnet-lite0/",
    "sha256": "e1" * 32,
}
S3 = {**MINIMAL, "model": S3_MODEL}
HTTPS = {**MINIMAL, "model": HTTPS_MODEL}


def children(spec: dict[str, Any], name: str = "tp") -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (m["kind"], m["metadata"]["name"]): m for m in render(name, "ns", "uid-9", parse_spec(spec))
    }


def pod(spec: dict[str, Any], component: str) -> dict[str, Any]:
    pod_spec: dict[str, Any] = children(spec)["Deployment", f"tp-{component}"]["spec"]["template"][
        "spec"
    ]
    return pod_spec


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize(
    "spec", [SAMPLE, MINIMAL, S3, HTTPS], ids=["sample", "minimal", "s3", "https"]
)
def test_children_are_valid_kubernetes_objects(spec: dict[str, Any]) -> None:
    objs = children(spec)
    kinds = sorted(k for k, _ in objs)
    assert kinds == sorted(
        ["ServiceAccount", "ConfigMap", "Service"]
        + ["Deployment"] * 3
        + ["PodDisruptionBudget"] * 3
    )
    for obj in objs.values():
        kubernetes_validate.validate(obj, "1.25.0", strict=True)  # raises on any schema error


def test_owner_references_and_labels() -> None:
    for obj in children(MINIMAL).values():
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "tagpipe.io/v1alpha1",
            "kind": "TagPipeline",
            "name": "tp",
            "uid": "uid-9",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "tp"
        assert labels["app.kubernetes.io/managed-by"] == "tagpipe-operator"


def test_inference_defaults_to_t4_gpu_nodes() -> None:
    p = pod(MINIMAL, "inference")
    assert p["nodeSelector"] == {"nvidia.com/gpu.product": "Tesla-T4"}
    assert p["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert p["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "CUDAExecutionProvider" in env_of(p["containers"][0])["TAGPIPE_PROVIDERS"]
    for other in ("gateway", "downloader"):  # only inference goes to GPU nodes
        assert "nodeSelector" not in pod(MINIMAL, other) and "tolerations" not in pod(
            MINIMAL, other
        )


def test_placement_overrides_replace_the_defaults() -> None:
    spec = copy.deepcopy(MINIMAL)
    spec["inference"] = {
        "gpu": 2,
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
        ],
    }
    p = pod(spec, "inference")
    assert p["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert [t["key"] for t in p["tolerations"]] == ["dedicated"]
    assert p["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_gpu_zero_runs_on_cpu() -> None:
    spec = {**MINIMAL, "inference": {"gpu": 0}}
    p = pod(spec, "inference")
    assert "nodeSelector" not in p and "tolerations" not in p
    assert "nvidia.com/gpu" not in p["containers"][0]["resources"].get("limits", {})
    assert env_of(p["containers"][0])["TAGPIPE_PROVIDERS"] == "CPUExecutionProvider"


def test_gpu_settings_reach_inference_and_decode_reaches_both_tiers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inf = env_of(pod(MINIMAL, "inference")["containers"][0])
    assert inf["TAGPIPE_DECODE"] == "cpu" and inf["TAGPIPE_FP16"] == "false"
    assert inf["TAGPIPE_REQUIRE_GPU"] == "true"  # a GPU replica never serves on CPU
    assert "TAGPIPE_TRT_ENGINE_CACHE_DIR" not in inf  # no TensorRT asked for
    trt = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    spec = {
        **MINIMAL,
        "inference": {"decode": "gpu", "providers": trt, "deviceId": 1, "fp16": True},
    }
    env = env_of(pod(spec, "inference")["containers"][0])
    assert env["TAGPIPE_PROVIDERS"] == ",".join(trt)
    assert (env["TAGPIPE_DECODE"], env["TAGPIPE_DEVICE_ID"], env["TAGPIPE_FP16"]) == (
        "gpu",
        "1",
        "true",
    )
    assert env["TAGPIPE_TRT_ENGINE_CACHE_DIR"].startswith("/tmp/")  # the pod's writable emptyDir
    assert env_of(pod(spec, "downloader")["containers"][0])["TAGPIPE_DECODE"] == "gpu"
    s = _load(InferenceSettings, {**config_data(parse_spec(spec)), **env}, monkeypatch)
    assert s.gpu_options.fp16 and s.gpu_options.device_id == 1 and s.decode == "gpu"
    cpu = env_of(pod({**MINIMAL, "inference": {"gpu": 0}}, "inference")["containers"][0])
    assert cpu["TAGPIPE_REQUIRE_GPU"] == "false"


def test_the_hop_encoding_reaches_the_downloader_as_a_setting_it_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert env_of(pod(MINIMAL, "downloader")["containers"][0])["TAGPIPE_HOP_ENCODING"] == "raw"
    spec = {**MINIMAL, "downloader": {"hopEncoding": "original"}}
    env = env_of(pod(spec, "downloader")["containers"][0])
    assert env["TAGPIPE_HOP_ENCODING"] == "original"
    s = _load(DownloaderSettings, {**config_data(parse_spec(spec)), **env}, monkeypatch)
    assert s.hop_encoding == "original"


@pytest.mark.parametrize("component", ["gateway", "downloader", "inference"])
def test_strict_pod_security(component: str) -> None:
    p = pod(SAMPLE, component)
    assert p["automountServiceAccountToken"] is False
    assert p["securityContext"]["runAsNonRoot"] is True
    assert p["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = p["containers"][0]
    assert c["command"] == [COMMANDS[component]]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # writable scratch


def test_credentials_come_from_secrets_not_the_configmap() -> None:
    objs = children(SAMPLE)
    data = objs["ConfigMap", "tp-config"]["data"]
    assert "TAGPIPE_NATS_URL" not in data and "TAGPIPE_REDIS_URL" not in data
    env = env_of(pod(SAMPLE, "downloader")["containers"][0])
    assert env["TAGPIPE_NATS_URL"] == {"secretKeyRef": {"name": "tagpipe-nats", "key": "url"}}
    assert env["TAGPIPE_REDIS_URL"] == {"secretKeyRef": {"name": "tagpipe-redis", "key": "url"}}
    gw = pod(SAMPLE, "gateway")
    assert env_of(gw["containers"][0])["TAGPIPE_API_KEYS_FILE"] == "/var/run/tagpipe/api-keys/keys"
    assert {"name": "api-keys", "secret": {"secretName": "tagpipe-api-keys"}} in gw["volumes"]


def test_model_volume_from_pvc_uri() -> None:
    p = pod(MINIMAL, "inference")
    vol = next(v for v in p["volumes"] if v["name"] == "model")
    assert vol["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mount = next(m for m in p["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount["subPath"] == "dir/m" and mount["readOnly"] is True


def test_model_from_s3_is_fetched_into_an_empty_dir_by_an_init_container() -> None:
    for component in ("downloader", "inference"):
        p = pod(S3, component)
        assert {"name": "model", "emptyDir": {}} in p["volumes"]
        (init,) = p["initContainers"]
        main = p["containers"][0]
        assert init["image"] == main["image"]  # the worker's own image carries the fetcher
        assert init["command"] == ["python", "-m", "tagpipe_common.storage"]
        assert init["args"][:4] == [
            "--uri",
            "s3://models/efficientnet-lite0",
            "--dest",
            "/models/model",
        ]
        # Endpoint and credentials from the Secret, into the init container only.
        assert init["envFrom"] == [{"secretRef": {"name": "model-store"}}]
        assert "model-store" not in str(main)
        assert init["securityContext"] == main["securityContext"]
        (mount,) = [m for m in init["volumeMounts"] if m["name"] == "model"]
        assert mount["mountPath"] == "/models/model" and not mount.get("readOnly")
        (mount,) = [m for m in main["volumeMounts"] if m["name"] == "model"]
        assert mount == {"name": "model", "mountPath": "/models/model", "readOnly": True}
    assert "--manifest-only" in pod(S3, "downloader")["initContainers"][0]["args"]
    assert "--manifest-only" not in pod(S3, "inference")["initContainers"][0]["args"]
    assert "initContainers" not in pod(S3, "gateway")


def test_model_from_https_passes_its_pin() -> None:
    (init,) = pod(HTTPS, "inference")["initContainers"]
    assert init["args"][init["args"].index("--sha256") + 1] == "e1" * 32
    assert "envFrom" not in init


def test_a_mounted_model_has_no_init_container() -> None:
    assert "initContainers" not in pod(MINIMAL, "inference")


def test_the_fetcher_is_in_both_worker_images() -> None:
    import tomllib

    from tagpipe_common import storage

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(d.startswith("boto3") for d in extras["storage"])
    for extra in ("downloader", "inference", "inference-gpu"):
        assert "tagpipe[storage]" in extras[extra]
    assert storage.main.__module__ == "tagpipe_common.storage"


def _load(cls: type[CommonSettings], env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(key, value)
    return cls()


@pytest.mark.parametrize(
    ("component", "cls"),
    [
        ("gateway", GatewaySettings),
        ("downloader", DownloaderSettings),
        ("inference", InferenceSettings),
    ],
)
def test_rendered_env_is_what_each_component_reads(
    component: str, cls: type[CommonSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = {
        **MINIMAL,
        "downloader": {"limits": {"maxBytes": 4096, "concurrency": 7}},
        "inference": {"batching": {"maxBatch": 48, "maxWaitMs": 15}},
    }
    env = {**config_data(parse_spec(spec)), **env_of(pod(spec, component)["containers"][0])}
    fields = set(cls.model_fields)
    for key in env:  # every variable we set names a real setting of that component
        assert key.removeprefix("TAGPIPE_").lower() in fields, key
    s = _load(cls, env, monkeypatch)  # and the values validate
    assert s.nats_url == "nats://nats:4222"
    if component != "gateway":
        assert str(s.model_dir) == "/models/model"
    if component == "downloader":
        assert (s.max_bytes, s.max_inflight) == (4096, 7)
    if component == "inference":
        assert (s.max_batch, s.max_wait_ms) == (48, 15)


def test_config_checksum_tracks_config_only() -> None:
    def sums(spec: dict[str, Any]) -> set[str]:
        return {
            m["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION]
            for m in render("tp", "ns", "u", parse_spec(spec))
            if m["kind"] == "Deployment"
        }

    base = sums(MINIMAL)
    assert len(base) == 1
    assert sums(copy.deepcopy(MINIMAL)) == base  # deterministic
    assert sums({**MINIMAL, "nats": {"url": "nats://other:4222"}}) != base


def test_replicas_are_never_applied_only_set_through_scale_on_create() -> None:
    for obj in render("tp", "ns", "u", parse_spec(SAMPLE)):
        body, replicas = without_replicas(obj)
        assert "replicas" not in body.get("spec", {})
        if obj["kind"] == "Deployment":
            assert replicas is not None and replicas >= 1 and obj["spec"]["replicas"] == replicas
            assert body["spec"]["template"] == obj["spec"]["template"]
        else:
            assert replicas is None and body == obj


def test_a_sentinel_redis_and_its_wait_reach_every_component(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "redis+sentinel://redis-0.redis:26379,redis-1.redis:26379,redis-2.redis:26379/tagpipe/0"
    spec = {**MINIMAL, "redis": {"url": url, "waitReplicas": 2}}
    data = config_data(parse_spec(spec))
    assert (data["TAGPIPE_REDIS_URL"], data["TAGPIPE_REDIS_WAIT_REPLICAS"]) == (url, "2")
    s = _load(InferenceSettings, data, monkeypatch)
    assert s.redis_url == url and s.redis_durability().replicas == 2
    assert "TAGPIPE_REDIS_WAIT_REPLICAS" not in config_data(parse_spec(MINIMAL))  # the default


def test_dedupe_is_off_unless_asked_and_its_ttl_reaches_both_tiers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    off = env_of(pod(MINIMAL, "downloader")["containers"][0])
    assert off["TAGPIPE_CONTENT_DEDUPE"] == "false"
    spec = {**MINIMAL, "dedupe": {"enabled": True, "ttlSeconds": 3600}}
    data = config_data(parse_spec(spec))
    down = {**data, **env_of(pod(spec, "downloader")["containers"][0])}
    inf = {**data, **env_of(pod(spec, "inference")["containers"][0])}
    d = _load(DownloaderSettings, down, monkeypatch)
    assert d.content_dedupe and d.content_dedupe_ttl_s == 3600
    assert _load(InferenceSettings, inf, monkeypatch).content_dedupe_ttl_s == 3600


# -- pod lifecycle: start-up, probes, termination ---------------------------------------


def _container(spec: dict[str, Any], component: str) -> dict[str, Any]:
    container: dict[str, Any] = pod(spec, component)["containers"][0]
    return container


def _startup_budget_s(container: dict[str, Any]) -> int:
    probe = container["startupProbe"]
    return int(probe["periodSeconds"] * probe["failureThreshold"])


CPU_INFERENCE = {**MINIMAL, "inference": {"gpu": 0}}
TRT_ON_CPU_NODE = {**MINIMAL, "inference": {"gpu": 0, "providers": ["TensorrtExecutionProvider"]}}


@pytest.mark.parametrize("component", ["gateway", "downloader", "inference"])
def test_a_startup_probe_covers_the_dependency_waits_and_liveness_stays_strict(
    component: str,
) -> None:
    container = _container(CPU_INFERENCE, component)
    common = CommonSettings.model_fields
    waits = common["redis_startup_timeout_s"].default + common["nats_startup_timeout_s"].default
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert _startup_budget_s(container) > waits  # then the process itself starts
    live = container["livenessProbe"]
    assert (live["httpGet"]["path"], live["periodSeconds"], live["failureThreshold"]) == (
        "/healthz",
        10,
        3,
    )
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_gpu_inference_gets_a_start_up_budget_for_an_engine_build() -> None:
    cpu = _startup_budget_s(_container(CPU_INFERENCE, "inference"))
    gpu = _startup_budget_s(_container(SAMPLE, "inference"))  # gpu: 1
    trt = _startup_budget_s(_container(TRT_ON_CPU_NODE, "inference"))
    assert gpu >= cpu + 600 and trt == gpu
    # The model is only inference's: the other stages' budgets do not grow with a GPU.
    assert _startup_budget_s(_container(SAMPLE, "downloader")) == _startup_budget_s(
        _container(CPU_INFERENCE, "downloader")
    )


def test_the_grace_period_outlasts_the_downloaders_drain() -> None:
    drain = DownloaderSettings.model_fields["drain_timeout_s"].default
    grace = pod(MINIMAL, "downloader")["terminationGracePeriodSeconds"]
    assert grace >= drain + 10 + 5  # the worker's drain, the NATS drain, a margin
    assert "lifecycle" not in _container(MINIMAL, "downloader")  # no Service to leave

    slow = {**MINIMAL, "downloader": {"env": [{"name": "TAGPIPE_DRAIN_TIMEOUT_S", "value": "300"}]}}
    assert pod(slow, "downloader")["terminationGracePeriodSeconds"] >= 300 + 10 + 5


def test_inference_may_finish_its_batches_within_an_ack_wait() -> None:
    ack_wait = CommonSettings.model_fields["ack_wait_s"].default
    assert pod(MINIMAL, "inference")["terminationGracePeriodSeconds"] > ack_wait
    assert "lifecycle" not in _container(MINIMAL, "inference")


def test_the_gateway_leaves_the_service_before_it_stops_accepting() -> None:
    import inspect

    import tagpipe_gateway.__main__ as gateway_main

    source = inspect.getsource(gateway_main)
    shutdown = int(source.split("timeout_graceful_shutdown=")[1].split(",")[0].split(")")[0])
    pre_stop = _container(MINIMAL, "gateway")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) >= 5
    grace = pod(MINIMAL, "gateway")["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + shutdown + 5


def test_a_slow_model_sets_its_own_start_up_budget() -> None:
    slow = {**MINIMAL, "inference": {"gpu": 0, "startupSeconds": 1800}}
    assert _startup_budget_s(_container(slow, "inference")) == 1800
    assert _startup_budget_s(_container(slow, "downloader")) == _startup_budget_s(
        _container(MINIMAL, "downloader")
    )
