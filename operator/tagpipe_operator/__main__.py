"""`tagpipe-operator`: run the TagPipeline operator, one leader among replicas.

Every replica runs this; only the holder of the Lease (leader.py) runs kopf
and the scaling loop, so a standby writes nothing but its Lease attempts.
kopf's peering is not leader election (equal-priority peers all pause), so it
is not used. A leader that loses its Lease stops kopf and exits non-zero; the
kubelet restarts it as a standby. Restarts are safe because the operator keeps
no state that matters: children converge idempotently (server-side apply),
replicas live in the Deployments, kopf's progress lives in the CR, and the
scaler's lost history only delays scale-downs by one window.

/healthz answers on every replica: a standby's is a plain 200 while it waits;
on the leader, kopf's liveness endpoint takes the port over (it reports whether
kopf's own activities run).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys

import kopf
from aiohttp import web
from lightkube import KubeConfig
from prometheus_client import start_http_server
from tagpipe_common import telemetry
from tagpipe_common.settings import load_settings

from tagpipe_operator.handlers import register
from tagpipe_operator.kube import KubeClient
from tagpipe_operator.leader import LeaderElector
from tagpipe_operator.settings import OperatorSettings


async def health(port: int) -> web.AppRunner | None:
    if not port:
        return None

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


def elector(settings: OperatorSettings, kube: KubeClient) -> LeaderElector:
    """Identity and namespace from the downward API (POD_NAME, POD_NAMESPACE)."""
    return LeaderElector(
        kube=kube,
        namespace=os.environ.get("POD_NAMESPACE") or settings.namespace or "default",
        name=settings.lease_name,
        identity=os.environ.get("POD_NAME") or socket.gethostname(),
        duration_s=settings.lease_duration_s,
        renew_s=settings.lease_renew_s,
        renew_deadline_s=settings.lease_renew_deadline_s,
    )


async def serve(settings: OperatorSettings) -> int:
    """Wait for the Lease, run kopf while holding it; the exit status to return."""
    probe = await health(settings.health_port)
    kube = KubeClient.from_config(KubeConfig.from_env())
    leader = elector(settings, kube)
    await leader.acquire()
    if probe is not None:  # kopf's liveness endpoint serves the port from here on
        await probe.cleanup()
        probe = None
    lost = asyncio.Event()
    holding = asyncio.create_task(leader.hold(lost), name="tagpipe-lease")
    registry = kopf.OperatorRegistry()
    register(registry, settings, elector=leader)
    try:
        await kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=settings.namespace is None,
            namespaces=[settings.namespace] if settings.namespace else (),
            stop_flag=lost,
            liveness_endpoint=(
                f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
            ),
        )
    finally:
        holding.cancel()
        await leader.release()
        await kube.close()
    return 1 if lost.is_set() else 0


def main() -> None:
    settings = load_settings(OperatorSettings)
    # JSON lines like every other component (kopf's per-object chatter is held at WARNING).
    telemetry.setup_logging("operator", settings.log_level, settings.log_json)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request otherwise
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    sys.exit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
