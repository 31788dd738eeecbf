"""`tagpipe-operator`: run the TagPipeline operator (one replica, Recreate).

Why one replica: kopf peering is not leader election, so two replicas could
both scale the same Deployment. Restarts are safe because the operator keeps
no state that matters: children converge idempotently (create or patch),
replicas live in the Deployments, kopf's progress lives in the CR's
annotations/status, and the scaler's lost history only delays scale-downs by
one window (decide() never scales down before seeing a full window).
"""

from __future__ import annotations

import asyncio

import kopf
from prometheus_client import start_http_server
from tagpipe_common import telemetry
from tagpipe_common.settings import load_settings

from tagpipe_operator.handlers import register
from tagpipe_operator.settings import OperatorSettings


def main() -> None:
    settings = load_settings(OperatorSettings)
    # JSON lines like every other component (kopf's per-object chatter is held at WARNING).
    telemetry.setup_logging("operator", settings.log_level, settings.log_json)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    registry = kopf.OperatorRegistry()
    register(registry, settings)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=settings.namespace is None,
            namespaces=[settings.namespace] if settings.namespace else (),
            liveness_endpoint=liveness,
        )
    )


if __name__ == "__main__":
    main()
