"""End-to-end fixtures: a real cluster (KUBECONFIG) and a NATS the test can reach.

Opt-in: without KUBECONFIG pointing at a file and TAGPIPE_E2E_NATS_URL, every
test here is reported as skipped, with the reason. Only the Kubernetes API is
needed (no pod has to run): the operator runs in-process (KopfRunner) against
the cluster, and scaling/ownership are read from the API objects.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from e2e_helpers import eventually
from kopf.testing import KopfRunner
from nats.aio.client import Client
from tagpipe_common.nats_io import connect_nats
from tagpipe_operator.handlers import register
from tagpipe_operator.kube import ApiError, KubeClient
from tagpipe_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "tagpipelines.tagpipe.io.yaml"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def _skip_reason() -> str | None:
    kubeconfig = os.environ.get("KUBECONFIG", "")
    if not kubeconfig or not all(Path(p).is_file() for p in kubeconfig.split(os.pathsep)):
        return "e2e needs KUBECONFIG pointing at a cluster's kubeconfig file"
    if not os.environ.get("TAGPIPE_E2E_NATS_URL"):
        return "e2e needs TAGPIPE_E2E_NATS_URL (a NATS JetStream reachable from here)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    for item in items:
        item.add_marker(pytest.mark.e2e)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def connection() -> kopf.ConnectionInfo:
    info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    assert info is not None, "kubeconfig could not be read"
    return info


@pytest.fixture
async def kube(connection: kopf.ConnectionInfo) -> AsyncIterator[KubeClient]:
    client = KubeClient.from_connection(connection)
    yield client
    await client.close()


@pytest.fixture
async def crd(kube: KubeClient) -> dict[str, Any]:
    """Install (or update) the CRD from crds/, the one source of truth, and wait for it."""
    body: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    name = body["metadata"]["name"]
    try:
        await kube.request("POST", CRD_PATH, body)
    except ApiError as exc:
        if exc.status != 409:
            raise
        await kube.request(
            "PATCH", f"{CRD_PATH}/{name}", {"spec": body["spec"]}, "application/merge-patch+json"
        )

    async def established() -> bool:
        got = await kube.request("GET", f"{CRD_PATH}/{name}")
        conds = got.get("status", {}).get("conditions", [])
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    await eventually(established, within=30)
    return body


@pytest.fixture
async def namespace(kube: KubeClient, crd: dict[str, Any]) -> AsyncIterator[str]:
    ns = f"tagpipe-e2e-{uuid.uuid4().hex[:6]}"
    await kube.request(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
    )
    yield ns
    # A failed test may leave a TagPipeline whose finalizer nobody will remove
    # (the operator has stopped): drop it so the namespace can go.
    listing = await kube.request("GET", f"/apis/tagpipe.io/v1alpha1/namespaces/{ns}/tagpipelines")
    for item in listing.get("items", []):
        await kube.patch(
            "TagPipeline", ns, item["metadata"]["name"], {"metadata": {"finalizers": None}}
        )
    await kube.request("DELETE", f"/api/v1/namespaces/{ns}")


@pytest.fixture
def operator(connection: kopf.ConnectionInfo, namespace: str) -> Iterator[OperatorSettings]:
    """The real operator code, in-process, watching only the test's namespace."""
    settings = OperatorSettings(
        scale_interval_s=1.0,
        nats_timeout_s=3.0,
        converge_retry_s=2.0,
        stream_delete_retries=3,
        stream_delete_retry_s=1.0,
    )
    registry = kopf.OperatorRegistry()
    register(registry, settings, connection=connection)
    args = ["run", "--standalone", "--namespace", namespace]
    with KopfRunner(args, registry=registry, timeout=60):
        yield settings


@pytest.fixture
def nats_url() -> str:
    return os.environ["TAGPIPE_E2E_NATS_URL"]


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect_nats([u.strip() for u in nats_url.split(",")], "tagpipe-e2e")
    yield client
    await client.close()
