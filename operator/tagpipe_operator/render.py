"""Desired children of a TagPipeline: a pure function of (name, namespace, uid, spec).

`render()` returns plain manifests (dicts) and touches nothing; children.py
server-side applies them. Two rules keep the operator from fighting itself:

* `spec.replicas` of a Deployment is the first replicas only: no apply names
  it (children.without_replicas); the scaler is its single writer, through the
  `deployments/scale` subresource, from the create on.
* Pod templates carry a checksum of the rendered configuration, so a config
  change rolls the pods and an unchanged spec applies as a no-op.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from tagpipe_operator import lifecycle
from tagpipe_operator.flow import agreed_env
from tagpipe_operator.modelsource import fetch_container, model_volume
from tagpipe_operator.spec import (
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    T4_PRODUCT,
    InferenceSpec,
    StageSpec,
    TagPipelineSpec,
)

Manifest = dict[str, Any]

API_VERSION = "tagpipe.io/v1alpha1"
KIND = "TagPipeline"
MANAGED_BY = "tagpipe-operator"
CHECKSUM_ANNOTATION = "tagpipe.io/config-checksum"
MODEL_ANNOTATION = "tagpipe.io/model"
MODEL_MOUNT = "/models/model"
API_KEYS_MOUNT = "/var/run/tagpipe/api-keys"
GATEWAY_PORT = 8080
METRICS_PORT = 9090
HEALTH_PORT = 8081  # the workers' /healthz and /readyz
GPU_PROVIDERS = "CUDAExecutionProvider,CPUExecutionProvider"
CPU_PROVIDERS = "CPUExecutionProvider"
TRT_CACHE = "/tmp/tagpipe-trt"
RUN_AS = 10001
# `<name>-gateway` must fit a 63-character Service name, and the name is a label value.
MAX_NAME = 63 - len("-gateway")
COMMANDS = {
    "gateway": "tagpipe-gateway",
    "downloader": "tagpipe-downloader",
    "inference": "tagpipe-inference",
}


def child_name(name: str, component: str) -> str:
    return f"{name}-{component}"


def labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "tagpipe",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "tagpipe",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector(name: str, component: str) -> dict[str, str]:
    """The immutable subset of labels a Deployment/PDB/Service selects on."""
    return {k: v for k, v in labels(name, component).items() if "managed-by" not in k}


def _meta(name: str, namespace: str, uid: str, component: str, obj_name: str) -> Manifest:
    return {
        "name": obj_name,
        "namespace": namespace,
        "labels": labels(name, component),
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": name,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def config_data(spec: TagPipelineSpec) -> dict[str, str]:
    """TAGPIPE_* environment every component shares (CommonSettings fields)."""
    data = {
        "TAGPIPE_PREFIX": spec.nats.prefix,
        "TAGPIPE_LOG_JSON": "true",
        "TAGPIPE_METRICS_PORT": str(METRICS_PORT),
        "TAGPIPE_CONTENT_DEDUPE_TTL_S": str(spec.dedupe.ttl_seconds),  # inference writes with it
    }
    # URLs with credentials come from Secrets as container env (which wins over envFrom).
    if spec.nats.credentials_secret_ref is None:
        data["TAGPIPE_NATS_URL"] = spec.nats.url
    if spec.redis.credentials_secret_ref is None:
        data["TAGPIPE_REDIS_URL"] = spec.redis.url
    if spec.redis.wait_replicas is not None:
        data["TAGPIPE_REDIS_WAIT_REPLICAS"] = str(spec.redis.wait_replicas)
    return data | agreed_env(spec)  # what the consumers are set with, too (flow.py)


def component_env(component: str, spec: TagPipelineSpec) -> dict[str, str]:
    """Settings only one component reads (GatewaySettings, DownloaderSettings, ...)."""
    if component == "gateway":
        env = {"TAGPIPE_PORT": str(GATEWAY_PORT)}
        ref = spec.gateway.api_key_secret_ref
        if ref is not None:
            env["TAGPIPE_API_KEYS_FILE"] = f"{API_KEYS_MOUNT}/{ref.key}"
        return env
    if component == "downloader":
        lim = spec.downloader.limits
        return {
            "TAGPIPE_HEALTH_PORT": str(HEALTH_PORT),
            "TAGPIPE_MODEL_DIR": MODEL_MOUNT,
            "TAGPIPE_MAX_BYTES": str(lim.max_bytes),
            "TAGPIPE_MAX_PIXELS": str(lim.max_pixels),
            "TAGPIPE_TOTAL_TIMEOUT_S": str(lim.timeout_seconds),
            "TAGPIPE_MAX_INFLIGHT": str(lim.concurrency),
            "TAGPIPE_DECODE": spec.inference.decode,  # gpu: forward JPEGs compressed
            "TAGPIPE_HOP_ENCODING": spec.downloader.hop_encoding,
            "TAGPIPE_CONTENT_DEDUPE": str(spec.dedupe.enabled).lower(),
        }
    return _inference_env(spec.inference)


def _inference_env(inf: InferenceSpec) -> dict[str, str]:
    default = GPU_PROVIDERS if inf.gpu > 0 else CPU_PROVIDERS
    providers = ",".join(inf.providers) if inf.providers else default
    env = {
        "TAGPIPE_HEALTH_PORT": str(HEALTH_PORT),
        "TAGPIPE_MODEL_DIR": MODEL_MOUNT,
        "TAGPIPE_MAX_BATCH": str(inf.batching.max_batch),
        "TAGPIPE_MAX_WAIT_MS": str(inf.batching.max_wait_ms),
        "TAGPIPE_PROVIDERS": providers,
        "TAGPIPE_DECODE": inf.decode,
        "TAGPIPE_DEVICE_ID": str(inf.device_id),
        "TAGPIPE_FP16": str(inf.fp16).lower(),
        "TAGPIPE_REQUIRE_GPU": str(inf.gpu > 0 and inf.require_gpu).lower(),
    }
    if "TensorrtExecutionProvider" in providers:
        # /tmp is the pod's emptyDir: engines survive container restarts.
        env["TAGPIPE_TRT_ENGINE_CACHE_DIR"] = TRT_CACHE
    return env


def checksum(data: dict[str, str], *extra: Any) -> str:
    blob = json.dumps([data, *extra], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _secret_env(spec: TagPipelineSpec) -> list[Manifest]:
    env = []
    for var, ref in (
        ("TAGPIPE_NATS_URL", spec.nats.credentials_secret_ref),
        ("TAGPIPE_REDIS_URL", spec.redis.credentials_secret_ref),
    ):
        if ref is not None:
            env.append(
                {"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            )
    return env


def _security() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _placement(component: str, stage: StageSpec) -> Manifest:
    """nodeSelector/tolerations/affinity; inference defaults to T4 GPU nodes."""
    out: Manifest = {}
    gpu = isinstance(stage, InferenceSpec) and stage.gpu > 0
    node_selector = stage.node_selector
    if node_selector is None and gpu:
        node_selector = {GPU_PRODUCT_LABEL: T4_PRODUCT}
    tolerations = stage.tolerations
    if tolerations is None and gpu:
        tolerations = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    if node_selector:
        out["nodeSelector"] = dict(node_selector)
    if tolerations:
        out["tolerations"] = copy.deepcopy(tolerations)
    if stage.affinity:
        out["affinity"] = copy.deepcopy(stage.affinity)
    return out


def _resources(stage: StageSpec) -> Manifest:
    res: Manifest = copy.deepcopy(stage.resources or {})
    if isinstance(stage, InferenceSpec) and stage.gpu > 0:
        res.setdefault("limits", {})[GPU_RESOURCE] = stage.gpu
    return res


def _container(component: str, stage: StageSpec, spec: TagPipelineSpec, name: str) -> Manifest:
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"}]
    if component != "gateway":
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    if component == "gateway" and spec.gateway.api_key_secret_ref is not None:
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
    if component != "gateway":
        _, sub_path = model_volume(spec.model)
        if sub_path:
            mounts[-1]["subPath"] = sub_path
    ports = [{"name": "metrics", "containerPort": METRICS_PORT}]
    container: Manifest = {
        "name": component,
        "image": stage.image,
        "imagePullPolicy": stage.image_pull_policy,
        "command": [COMMANDS[component]],
        "envFrom": [{"configMapRef": {"name": child_name(name, "config")}}],
        # User env last: a later duplicate wins, so the spec can override anything.
        "env": _secret_env(spec)
        + [{"name": k, "value": v} for k, v in component_env(component, spec).items()]
        + [e.model_dump(by_alias=True, exclude_none=True) for e in stage.env],
        "ports": ports,
        "resources": _resources(stage),
        "volumeMounts": mounts,
        "securityContext": _security(),
    }
    port_name = "http" if component == "gateway" else "health"
    port = GATEWAY_PORT if component == "gateway" else HEALTH_PORT
    ports.insert(0, {"name": port_name, "containerPort": port})
    container.update(lifecycle.probes(component, stage, port_name))
    container.update(lifecycle.container_lifecycle(component))
    return container


def _volumes(component: str, spec: TagPipelineSpec) -> list[Manifest]:
    vols: list[Manifest] = [{"name": "tmp", "emptyDir": {}}]
    if component != "gateway":
        source, _ = model_volume(spec.model)
        vols.append({"name": "model", **source})
    ref = spec.gateway.api_key_secret_ref
    if component == "gateway" and ref is not None:
        vols.append({"name": "api-keys", "secret": {"secretName": ref.name}})
    return vols


def deployment(
    name: str, namespace: str, uid: str, spec: TagPipelineSpec, component: str
) -> Manifest:
    stage = spec.stage(component)
    data = config_data(spec)
    pod_spec: Manifest = {
        "serviceAccountName": child_name(name, "workers"),
        # No component talks to the Kubernetes API.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(component, stage, spec, name)],
        "volumes": _volumes(component, spec),
        **_placement(component, stage),
        **lifecycle.pod_lifecycle(component, spec),
    }
    if component != "gateway" and spec.model.fetched:
        pod_spec["initContainers"] = [
            fetch_container(
                component,
                spec.model,
                stage.image,
                stage.image_pull_policy,
                _security(),
                MODEL_MOUNT,
            )
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, namespace, uid, component, child_name(name, component)),
        "spec": {
            # Initial size only: see patch_body(). Scale-to-zero stages start asleep.
            "replicas": stage.replicas.min,
            "selector": {"matchLabels": selector(name, component)},
            "template": {
                "metadata": {
                    "labels": labels(name, component),
                    "annotations": {
                        CHECKSUM_ANNOTATION: checksum(data, _secret_env(spec)),
                        MODEL_ANNOTATION: f"{spec.model.name}:{spec.model.version}",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def service(name: str, namespace: str, uid: str, spec: TagPipelineSpec) -> Manifest:
    svc = spec.gateway.service
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, uid, "gateway", child_name(name, "gateway")),
        "spec": {
            "type": svc.type,
            "selector": selector(name, "gateway"),
            "ports": [{"name": "http", "port": svc.port, "targetPort": "http"}],
        },
    }


def config_map(name: str, namespace: str, uid: str, spec: TagPipelineSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name, namespace, uid, "config", child_name(name, "config")),
        "data": config_data(spec),
    }


def pod_disruption_budget(name: str, namespace: str, uid: str, component: str) -> Manifest:
    # maxUnavailable rather than minAvailable: it keeps working at 0 and 1 replicas
    # (scale to zero) without ever blocking a node drain completely.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, namespace, uid, component, child_name(name, component)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name, component)}},
    }


def service_account(name: str, namespace: str, uid: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        # Suffixed like every child: a TagPipeline named `default` must not claim
        # the namespace's `default` ServiceAccount.
        "metadata": _meta(name, namespace, uid, "workers", child_name(name, "workers")),
        "automountServiceAccountToken": False,
    }


def render(name: str, namespace: str, uid: str, spec: TagPipelineSpec) -> list[Manifest]:
    """Every child, in creation order (config and identity before the pods that use them)."""
    stages = ("gateway", "downloader", "inference")
    return [
        service_account(name, namespace, uid),
        config_map(name, namespace, uid, spec),
        *(deployment(name, namespace, uid, spec, c) for c in stages),
        service(name, namespace, uid, spec),
        *(pod_disruption_budget(name, namespace, uid, c) for c in stages),
    ]
