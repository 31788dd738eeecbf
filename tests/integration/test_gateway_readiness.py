"""Readiness through a Redis outage: two gateways, real NATS and Redis.

Kubernetes takes a pod out of its Service after `failureThreshold` (3) failed
readiness probes in a row. A Redis failover reaches every gateway at once, so a
readiness that asks Redis takes them all out together, and clients meet connection
errors instead of an answer. Measured here on the dependency check, which is what
`/readyz` was: every probe of every gateway fails for as long as Redis is away. The
probe the pods use (`/readyz`) stays 200 on every gateway, and the request path
answers 503 problem+json with Retry-After.
"""

from __future__ import annotations

import signal

import httpx
import pytest
from nats.js.client import JetStreamContext
from tagpipe_cli.servers import ServerProcess

from tests.integration.gateway_kit import gateway_client
from tests.tools import eventually

pytestmark = pytest.mark.integration

FAILURE_THRESHOLD = 3  # the rendered readinessProbe's (Kubernetes' default)
PROBES = FAILURE_THRESHOLD + 1  # an outage longer than three probe periods


def removed_from_service(statuses: list[int]) -> bool:
    """What the kubelet concludes from these probe answers, in order."""
    run = 0
    for status in statuses:
        run = run + 1 if status != 200 else 0
        if run >= FAILURE_THRESHOLD:
            return True
    return False


async def _until_ok(client: httpx.AsyncClient, path: str) -> None:
    async def ok() -> bool:
        return (await client.get(path)).status_code == 200

    await eventually(ok, within=20.0)


async def test_a_redis_outage_keeps_every_gateway_in_the_service(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> None:
    async with (
        gateway_client(nats_proc, redis_proc, ["key-a"]) as a,
        gateway_client(nats_proc, redis_proc, ["key-a"]) as b,
    ):
        gateways = {"a": a, "b": b}
        for c in gateways.values():
            assert (await c.get("/readyz/dependencies")).status_code == 200
        ready: dict[str, list[int]] = {k: [] for k in gateways}
        deps: dict[str, list[int]] = {k: [] for k in gateways}
        redis_proc.stop()
        try:
            for _ in range(PROBES):  # the kubelet's periods, replayed back to back
                for name, c in gateways.items():
                    ready[name].append((await c.get("/readyz")).status_code)
                    deps[name].append((await c.get("/readyz/dependencies")).status_code)
            answer = await a.get("/v1/jobs/j-0000000000000000")
        finally:
            redis_proc.start()
        # The old readiness (now the dependency check) would empty the Service...
        assert all(removed_from_service(s) for s in deps.values()), deps
        # ...the probe the pods use keeps every gateway in it...
        assert not any(removed_from_service(s) for s in ready.values()), ready
        # ...and each request gets a 503 problem+json it can retry.
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["code"] == "redis_unavailable"
        assert int(answer.headers["retry-after"]) > 0
        for c in gateways.values():  # the dependency check sees Redis come back
            await _until_ok(c, "/readyz/dependencies")


async def test_a_frozen_redis_primary_does_not_slow_the_probe(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> None:
    """A failover's old primary often vanishes without a reset (SIGSTOP here): the
    dependency check then waits out its own 2 s bound and fails, past the kubelet's
    default 1 s probe timeout; the probe the pods use touches nothing and answers."""
    async with gateway_client(nats_proc, redis_proc, ["key-a"]) as gw:
        assert redis_proc.proc is not None
        redis_proc.proc.send_signal(signal.SIGSTOP)
        try:
            ready = [(await gw.get("/readyz")).status_code for _ in range(PROBES)]
            deps = await gw.get("/readyz/dependencies")
        finally:
            redis_proc.proc.send_signal(signal.SIGCONT)
        assert ready == [200] * PROBES
        assert deps.status_code == 503 and deps.json()["checks"]["redis"].startswith("error")
        await _until_ok(gw, "/readyz/dependencies")
