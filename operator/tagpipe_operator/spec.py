"""The TagPipeline spec as typed models.

The CRD (`crds/tagpipelines.tagpipe.io.yaml`) is the source of truth for the
shape, the validation and the defaults; the API server applies them before the
operator ever sees an object. These models repeat the defaults so that the
operator renders the same thing from an object the API server did not default
(kmock, a hand-written dict), and `tests/unit/test_crd.py` fails if the two drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tagpipe_operator.scalelimits import PolicyType, RatePolicy, ScaleRules, Select
from tagpipe_operator.scaling import ScalingPolicy

T4_PRODUCT = "Tesla-T4"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GATEWAY_METRIC = "requests in flight"


class _Model(BaseModel):
    # Unknown fields are ignored, not refused: the API server already validated
    # the object, and an older operator must tolerate a newer CRD's fields.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class SecretRef(_Model):
    name: str
    key: str = "url"


class LocalRef(_Model):
    name: str


class ModelSource(_Model):
    name: str
    version: str
    storage_uri: str | None = None
    # The model file's sha256 (as manifest.json states it): required for https://.
    sha256: str | None = None
    storage_secret_ref: LocalRef | None = None
    volume: dict[str, Any] | None = None
    sub_path: str = ""

    @property
    def fetched(self) -> bool:
        """True when an init container fetches the model (https://, s3://), not a mount."""
        return self.storage_uri is not None and not self.storage_uri.startswith("pvc://")


class NatsSpec(_Model):
    url: str
    credentials_secret_ref: SecretRef | None = None
    prefix: str = "tagpipe"
    stream_replicas: int = 1
    # Streams per stage (tagpipe_common.subjects.partition_names).
    partitions: int = 1
    # Settings workers and consumers must agree on: one source (flow.py).
    max_deliver: int = 5
    ack_wait_seconds: int = 30


class RedisSpec(_Model):
    url: str  # redis://... or redis+sentinel://s1:26379,s2:26379,s3:26379/<master>/<db>
    credentials_secret_ref: SecretRef | None = None
    wait_replicas: int | None = None  # unset: the services' default (1 with Sentinel)


class Replicas(_Model):
    min: int = 1
    max: int = 10


class ScalePolicySpec(_Model):
    type: Literal["Pods", "Percent"]
    value: int
    period_seconds: int = 15

    def rule(self) -> RatePolicy:
        return RatePolicy(PolicyType(self.type), self.value, float(self.period_seconds))


SelectPolicy = Literal["Max", "Min", "Disabled"]


def _default_up() -> list[ScalePolicySpec]:
    # The HPA's own default: the larger of 4 pods or 100 % per 15 s.
    return [
        ScalePolicySpec(type="Pods", value=4, period_seconds=15),
        ScalePolicySpec(type="Percent", value=100, period_seconds=15),
    ]


def _default_down() -> list[ScalePolicySpec]:
    return [ScalePolicySpec(type="Percent", value=100, period_seconds=15)]


def _rules(policies: list[ScalePolicySpec], select: SelectPolicy) -> ScaleRules:
    return ScaleRules(tuple(p.rule() for p in policies), Select(select))


class Autoscaling(_Model):
    target_backlog_per_replica: int = 20
    activation_backlog: int = 0
    scale_up_stabilization_seconds: int = 0
    scale_down_stabilization_seconds: int = 300
    scale_up_policies: list[ScalePolicySpec] = Field(default_factory=_default_up)
    scale_up_select_policy: SelectPolicy = "Max"
    scale_down_policies: list[ScalePolicySpec] = Field(default_factory=_default_down)
    scale_down_select_policy: SelectPolicy = "Max"
    tolerance: float = 0.1
    scale_to_zero: bool = False
    # The rate term's defaults are the policy's own (one place; the CRD repeats them).
    target_utilization: float = ScalingPolicy.target_utilization
    backlog_drain_seconds: int = int(ScalingPolicy.drain_s)
    rate_window_seconds: int = int(ScalingPolicy.rate_window_s)
    backlog_floor: bool = ScalingPolicy.backlog_floor


class EnvVar(_Model):
    name: str
    value: str | None = None
    value_from: dict[str, Any] | None = None


class StageSpec(_Model):
    image: str = ""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: dict[str, Any] | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    affinity: dict[str, Any] | None = None
    env: list[EnvVar] = Field(default_factory=list)
    replicas: Replicas = Replicas()
    autoscaling: Autoscaling = Autoscaling()

    def scaling_policy(self) -> ScalingPolicy:
        a = self.autoscaling
        return ScalingPolicy(
            min_replicas=self.replicas.min,
            max_replicas=max(self.replicas.max, self.replicas.min),
            target_backlog=a.target_backlog_per_replica,
            activation_backlog=a.activation_backlog,
            scale_up_window_s=float(a.scale_up_stabilization_seconds),
            scale_down_window_s=float(a.scale_down_stabilization_seconds),
            scale_up=_rules(a.scale_up_policies, a.scale_up_select_policy),
            scale_down=_rules(a.scale_down_policies, a.scale_down_select_policy),
            tolerance=a.tolerance,
            scale_to_zero=a.scale_to_zero,
            in_flight_per_replica=self.in_flight_per_replica(),
            target_utilization=a.target_utilization,
            drain_s=float(a.backlog_drain_seconds),
            rate_window_s=float(a.rate_window_seconds),
            backlog_floor=a.backlog_floor,
        )

    def in_flight_per_replica(self) -> int | None:
        """Messages one busy replica holds unacked: the rate term's slots (None: off)."""
        return None


class ServiceSpec(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = 80


# Per-stage default classes, so a partly given block (`replicas: {max: 3}`)
# gets the same stage-specific defaults for the rest as the API server gives it.
class GatewayReplicas(Replicas):
    min: int = 2
    max: int = 4


class GatewayAutoscaling(Autoscaling):
    target_backlog_per_replica: int = 2000  # deprecated: the gateway scales on requests in flight
    target_in_flight_per_replica: int = 32


class DownloaderReplicas(Replicas):
    max: int = 20


class DownloaderAutoscaling(Autoscaling):
    # Its backlog is mostly downloads in flight, sized by latency, not by the CPU
    # the stage needs: as a floor it would keep idle replicas (docs/benchmarks.md).
    backlog_floor: bool = False


class InferenceReplicas(Replicas):
    max: int = 4


class InferenceAutoscaling(Autoscaling):
    target_backlog_per_replica: int = 64


class GatewaySpec(StageSpec):
    image: str = "tagpipe/gateway:0.1.0"
    replicas: GatewayReplicas = GatewayReplicas()
    autoscaling: GatewayAutoscaling = GatewayAutoscaling()
    service: ServiceSpec = ServiceSpec()
    api_key_secret_ref: SecretRef | None = None

    def scaling_policy(self) -> ScalingPolicy:
        # Its own load, not the queue: a backlog of published items costs a gateway nothing.
        target = self.autoscaling.target_in_flight_per_replica
        policy = super().scaling_policy()
        return replace(policy, target_backlog=target, metric=GATEWAY_METRIC, served_load=True)


class DownloadLimits(_Model):
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    timeout_seconds: int = 20
    concurrency: int = 32


class DownloaderSpec(StageSpec):
    image: str = "tagpipe/downloader:0.1.0"
    replicas: DownloaderReplicas = DownloaderReplicas()
    autoscaling: DownloaderAutoscaling = DownloaderAutoscaling()
    limits: DownloadLimits = DownloadLimits()
    # How a crop crosses to inference with decode: cpu (the downloader's hop.py):
    # original sends small JPEGs as downloaded (same answers, less CPU and bytes).
    hop_encoding: Literal["raw", "jpeg", "webp-lossless", "original"] = "raw"

    def in_flight_per_replica(self) -> int | None:
        return self.limits.concurrency


class Batching(_Model):
    max_batch: int = 32
    max_wait_ms: int = 10


Provider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class InferenceSpec(StageSpec):
    image: str = "tagpipe/inference:0.1.0"
    replicas: InferenceReplicas = InferenceReplicas()
    autoscaling: InferenceAutoscaling = InferenceAutoscaling()
    gpu: int = 1
    batching: Batching = Batching()
    # Where JPEGs are decoded: cpu (the downloader ships crops) or gpu (the
    # downloader forwards them compressed, inference decodes on its GPU).
    decode: Literal["cpu", "gpu"] = "cpu"
    providers: list[Provider] | None = None  # None: CUDA then CPU with a GPU, CPU without
    device_id: int = 0
    fp16: bool = False
    # With a GPU: exit 2 (and CrashLoop, visibly) rather than serve at CPU speed.
    require_gpu: bool = True
    # The startupProbe's budget; None: derived in lifecycle.py (model load, warm-up and,
    # with a GPU, a TensorRT engine build). A bigger model or a slow volume sets it.
    startup_seconds: int | None = Field(default=None, ge=10, le=3600)

    def in_flight_per_replica(self) -> int | None:
        # The worker fetches the next batch while one runs: two batches unacked.
        return self.batching.max_batch * 2


class DedupeSpec(_Model):
    """Content-addressed dedupe (docs/dedupe.md); off unless asked for."""

    enabled: bool = False
    ttl_seconds: int = 86400


class TagPipelineSpec(_Model):
    model: ModelSource
    nats: NatsSpec
    redis: RedisSpec
    gateway: GatewaySpec = GatewaySpec()
    downloader: DownloaderSpec = DownloaderSpec()
    inference: InferenceSpec = InferenceSpec()
    dedupe: DedupeSpec = DedupeSpec()
    deletion_policy: Literal["Retain", "Delete"] = "Retain"

    def stage(self, name: str) -> StageSpec:
        stages: dict[str, StageSpec] = {
            "gateway": self.gateway,
            "downloader": self.downloader,
            "inference": self.inference,
        }
        return stages[name]


STAGES: tuple[str, ...] = ("gateway", "downloader", "inference")


# A removed field is deprecated first: the CRD keeps it (marked Deprecated), these map it
# to its successor, and the operator says so in a Deprecated condition and an event.
# `maxScaleUpStep` was "replicas added per decision at most", one decision per 5 s tick.
STEP_PERIOD_S = 5
GATEWAY_BACKLOG_TARGET = 2000  # the CRD default, which the API server always fills in
_DEFAULT_UP = [
    {"type": "Pods", "value": 4, "periodSeconds": 15},
    {"type": "Percent", "value": 100, "periodSeconds": 15},
]


@dataclass(frozen=True)
class Deprecation:
    field: str  # spec.<stage>.autoscaling.maxScaleUpStep
    message: str


def _is_default_up(policies: Any) -> bool:
    # The API server writes the default when the field is absent, so "not given" reads as
    # the default list; anything else was asked for and wins over the old field.
    if policies is None:
        return True
    normal = [{"periodSeconds": 15, **dict(p)} for p in policies]
    return normal == _DEFAULT_UP


def _map_step(stage: str, autoscaling: dict[str, Any]) -> Deprecation:
    step = autoscaling.pop("maxScaleUpStep")
    field = f"spec.{stage}.autoscaling.maxScaleUpStep"
    if not _is_default_up(autoscaling.get("scaleUpPolicies")):
        return Deprecation(field, f"{field} is deprecated and ignored: scaleUpPolicies is set")
    policy = {"type": "Pods", "value": step, "periodSeconds": STEP_PERIOD_S}
    autoscaling["scaleUpPolicies"] = [policy]
    return Deprecation(
        field,
        f"{field} is deprecated: read as scaleUpPolicies "
        f"[{{type: Pods, value: {step}, periodSeconds: {STEP_PERIOD_S}}}]; set that instead",
    )


def map_deprecated(spec: Mapping[str, Any]) -> tuple[dict[str, Any], list[Deprecation]]:
    """The spec with each deprecated field replaced by its successor, and what was mapped.

    Pure: the input is not changed (a copy of each touched block is).
    """
    out = dict(spec)
    found: list[Deprecation] = []
    for stage in STAGES:
        block = out.get(stage)
        autoscaling = (block or {}).get("autoscaling") or {}
        if "maxScaleUpStep" not in autoscaling:
            continue
        autoscaling = dict(autoscaling)
        found.append(_map_step(stage, autoscaling))
        out[stage] = {**dict(block or {}), "autoscaling": autoscaling}
    found += _gateway_backlog_target(out)
    return out, found


def _gateway_backlog_target(spec: Mapping[str, Any]) -> list[Deprecation]:
    # No successor to map to (other units): accepted, ignored, and said so when asked for.
    autoscaling = (spec.get("gateway") or {}).get("autoscaling") or {}
    asked = autoscaling.get("targetBacklogPerReplica", GATEWAY_BACKLOG_TARGET)
    if asked == GATEWAY_BACKLOG_TARGET:
        return []
    field = "spec.gateway.autoscaling.targetBacklogPerReplica"
    return [
        Deprecation(
            field,
            f"{field} is deprecated and ignored: the gateway scales on its requests in flight "
            "(targetInFlightPerReplica)",
        )
    ]


def parse_spec(spec: Any) -> TagPipelineSpec:
    """Typed spec from a CR's `spec` (a kopf.Spec or a plain dict), deprecated fields mapped."""
    mapped, _ = map_deprecated(dict(spec))
    return TagPipelineSpec.model_validate(mapped)
