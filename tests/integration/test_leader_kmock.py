"""Leader election (leader.py) against kmock's API: who holds the Lease, and when it moves.

kmock never bumps resourceVersion, so the optimistic lock that keeps two standbys from
both taking an expired Lease is the API server's part and is exercised by `make e2e`
(e2e/test_operator_ha_e2e.py); this covers the election's own rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
from tagpipe_operator.kube import KubeClient
from tagpipe_operator.leader import LeaderElector

from tests.integration.kmock_kit import RESOURCES, ApplyingEmulator, find, serve
from tests.tools import eventually

pytestmark = [pytest.mark.integration, pytest.mark.kmock(cls=ApplyingEmulator)]

LEASES = "coordination.k8s.io/v1/leases"
NS, NAME = "tagpipe-system", "tagpipe-operator"


@pytest.fixture
async def clients(kmock: Any) -> AsyncIterator[tuple[KubeClient, KubeClient]]:
    serve(kmock, {**RESOURCES, LEASES: ("Lease", True, [])})
    conn = kopf.ConnectionInfo(server=str(kmock.url), insecure=True)
    a, b = KubeClient.from_connection(conn), KubeClient.from_connection(conn)
    yield a, b
    await a.close()
    await b.close()


def elector(kube: KubeClient, identity: str) -> LeaderElector:
    return LeaderElector(kube, NS, NAME, identity, duration_s=2, renew_s=0.2, renew_deadline_s=1.5)


def spec(kmock: Any) -> dict[str, Any]:
    return dict((find(kmock, LEASES, NS, NAME) or {}).get("spec") or {})


async def test_one_holder_a_takeover_only_after_expiry_and_a_release_hands_over_at_once(
    kmock: Any, clients: tuple[KubeClient, KubeClient]
) -> None:
    a, b = elector(clients[0], "pod-a"), elector(clients[1], "pod-b")
    await a.acquire()
    assert a.leading and spec(kmock)["holderIdentity"] == "pod-a"
    assert spec(kmock)["leaseDurationSeconds"] == 2

    # While pod-a renews, pod-b never takes the Lease.
    renewing = asyncio.create_task(a.hold(asyncio.Event()))
    for _ in range(5):
        assert not await b._try()
        await asyncio.sleep(0.5)
    assert spec(kmock)["holderIdentity"] == "pod-a"
    renewing.cancel()  # pod-a is gone without a word (kill -9): the record stops changing

    await eventually(b._try, within=30)
    after = spec(kmock)
    assert b.leading and after["holderIdentity"] == "pod-b"
    assert after["leaseTransitions"] == 1

    # pod-a comes back believing it leads: its next renewal sees pod-b and it steps down.
    lost = asyncio.Event()
    await asyncio.wait_for(a.hold(lost), timeout=30)
    assert lost.is_set() and not a.leading
    assert spec(kmock)["holderIdentity"] == "pod-b"

    # A graceful stop releases: the other takes it on its very next attempt.
    await b.release()
    assert not b.leading and not spec(kmock).get("holderIdentity")
    assert not await b._try()  # a released elector never takes the Lease back
    assert not spec(kmock).get("holderIdentity")
    assert await a._try()
    assert spec(kmock)["holderIdentity"] == "pod-a"


async def test_api_errors_are_not_leadership_and_do_not_raise(
    kmock: Any, clients: tuple[KubeClient, KubeClient]
) -> None:
    """A 403 (the Role missing) or any other refusal: no leadership, no crash, a retry."""
    kmock["get", kmock.resource(LEASES)] << 403
    a = elector(clients[0], "pod-a")
    assert not await a._try()
    assert not a.leading
    assert find(kmock, LEASES, NS, NAME) is None  # refused at the read: nothing written
