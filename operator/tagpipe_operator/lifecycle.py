"""How each stage's pod starts, is probed and stops: pure values for `render()`.

Probes, all on the stage's `/healthz` (liveness, startup) and `/readyz` (readiness):

* startupProbe: the budget a stage needs before its health server answers at all.
  Every stage first waits for Redis and NATS (`TAGPIPE_*_STARTUP_TIMEOUT_S`, 15 s each);
  inference also loads its model and runs one warm-up batch at max batch, and on a GPU
  (gpu > 0, or TensorRT named in the providers) may build a TensorRT engine, which takes
  minutes. Liveness only starts counting once the startupProbe has passed, so it stays
  strict (3 x 10 s) without killing slow starters into CrashLoopBackOff.
* livenessProbe: the process serves HTTP; restarting it is the cure.
* readinessProbe: this pod can take traffic. For the gateway that is the process alone:
  a Redis or NATS outage hits every gateway at once, and taking them all out of the
  Service would turn the gateway's 503 problem+json into connection errors. The
  dependency check lives on the gateway's `/readyz/dependencies` instead.

Stopping: `terminationGracePeriodSeconds` covers the preStop hook plus each stage's own
drain after SIGTERM plus a margin, so the kubelet's SIGKILL never lands mid-drain:

* gateway: a preStop sleep first, while the endpoints controller takes the terminating
  pod out of the Service (kube-proxies and load balancers learn it a few seconds later),
  so no request meets a closed port; then uvicorn's graceful shutdown (10 s).
* downloader: the worker's drain (`TAGPIPE_DRAIN_TIMEOUT_S`, 60 s by default, or the
  stage's own env value) and then the NATS connection's drain (10 s).
* inference: the batches in flight finish and are acked; a batch is seconds on CPU, so
  the bound is the pipeline's ack wait (30 s), after which JetStream redelivers anyway.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from tagpipe_operator.spec import InferenceSpec, StageSpec, TagPipelineSpec

Manifest = dict[str, Any]

PROBE_PERIOD_S = 10
STARTUP_PERIOD_S = 5
DEPENDENCY_WAIT_S = 15 + 15  # require_redis + require_nats (CommonSettings defaults)
START_BUDGET_S = {"gateway": 30, "downloader": 30, "inference": 90}
GPU_ENGINE_BUILD_S = 600  # a TensorRT engine build for one model, several batch shapes
PRESTOP_SLEEP_S = 10  # endpoint removal reaching kube-proxy and load balancers
GATEWAY_SHUTDOWN_S = 10  # uvicorn timeout_graceful_shutdown in tagpipe_gateway.__main__
DOWNLOADER_DRAIN_S = 60.0  # DownloaderSettings.drain_timeout_s default
NATS_DRAIN_S = 10  # the downloader's nc.drain() bound after its worker stops
INFERENCE_DRAIN_S = 30  # CommonSettings.ack_wait_s: past it the batch is redelivered anyway
GRACE_MARGIN_S = 15


def builds_gpu_engine(stage: StageSpec) -> bool:
    if not isinstance(stage, InferenceSpec):
        return False
    return stage.gpu > 0 or "TensorrtExecutionProvider" in (stage.providers or [])


def startup_budget_s(component: str, stage: StageSpec) -> int:
    """Seconds from container start until its health server must have answered."""
    if isinstance(stage, InferenceSpec) and stage.startup_seconds is not None:
        return stage.startup_seconds
    budget = DEPENDENCY_WAIT_S + START_BUDGET_S[component]
    if builds_gpu_engine(stage):
        budget += GPU_ENGINE_BUILD_S
    return budget


def _env_seconds(stage: StageSpec, var: str, default: float) -> float:
    """A duration the stage's own env overrides (the later entry wins, as in the pod)."""
    value = default
    for entry in stage.env:
        if entry.name == var and entry.value is not None:
            # A bad number: the service refuses it at start-up with its own message.
            with contextlib.suppress(ValueError):
                value = float(entry.value)
    return value


def drain_s(component: str, stage: StageSpec) -> float:
    """Seconds a stage may take between SIGTERM and exiting 0."""
    if component == "gateway":
        return GATEWAY_SHUTDOWN_S
    if component == "downloader":
        return _env_seconds(stage, "TAGPIPE_DRAIN_TIMEOUT_S", DOWNLOADER_DRAIN_S) + NATS_DRAIN_S
    return INFERENCE_DRAIN_S


def pre_stop_s(component: str) -> int:
    # Workers pull from JetStream and take no Service traffic: nothing to wait for.
    return PRESTOP_SLEEP_S if component == "gateway" else 0


def grace_period_s(component: str, stage: StageSpec) -> int:
    return math.ceil(pre_stop_s(component) + drain_s(component, stage) + GRACE_MARGIN_S)


def probes(component: str, stage: StageSpec, port_name: str) -> Manifest:
    """startupProbe, livenessProbe and readinessProbe of the stage's container."""
    budget = startup_budget_s(component, stage)
    return {
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": port_name},
            "periodSeconds": STARTUP_PERIOD_S,
            "failureThreshold": math.ceil(budget / STARTUP_PERIOD_S),
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": port_name},
            "periodSeconds": PROBE_PERIOD_S,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": port_name},
            "periodSeconds": PROBE_PERIOD_S,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
    }


def container_lifecycle(component: str) -> Manifest:
    """The container's `lifecycle` (empty: no hook)."""
    sleep = pre_stop_s(component)
    if not sleep:
        return {}
    # An exec sleep, not the `sleep` action: that needs Kubernetes 1.29+ and the chart
    # supports 1.24. Both base images (python slim, ubuntu) carry /bin/sleep.
    return {"lifecycle": {"preStop": {"exec": {"command": ["sleep", str(sleep)]}}}}


def pod_lifecycle(component: str, spec: TagPipelineSpec) -> Manifest:
    return {"terminationGracePeriodSeconds": grace_period_s(component, spec.stage(component))}
