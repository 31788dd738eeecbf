"""End-to-end fixtures: a real Kubernetes API server (KUBECONFIG) and a real NATS.

`make e2e` gives KUBECONFIG: the cluster it names, or, when unset, the control
plane in ../shared/k8s started for the run (e2e/run.sh). Without KUBECONFIG, a
plain `pytest e2e` reports every test skipped with the reason; `make e2e` sets
TAGPIPE_E2E_REQUIRED=1, which turns that skip into an error (CI never skips).

NATS: TAGPIPE_E2E_NATS_URL when set, else a nats-server this session starts under
.tagpipe/e2e/ (the one launcher the tests and `tagpipe up` share). The operator runs
as its own process (`python -m tagpipe_operator`), authenticated with the token of
the ServiceAccount the chart creates: it can do exactly what the chart grants. No
pod has to run: scaling and ownership are read from the API objects.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from e2e_helpers import (
    ROOT,
    TP_PATH,
    OperatorProcess,
    admin_kubeconfig,
    conditions,
    eventually,
    run,
    token_kubeconfig,
)
from nats.aio.client import Client
from tagpipe_cli.servers import ServerProcess, nats_server
from tagpipe_common.nats_io import connect_nats

from tests.kube_rest import ApiError, KubeClient

CRD_FILE = ROOT / "crds" / "tagpipelines.tagpipe.io.yaml"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
# Fast enough for a test, slow enough for a busy 2-core machine.
OPERATOR_SETTINGS = {
    "TAGPIPE_SCALE_INTERVAL_S": "1",
    "TAGPIPE_NATS_TIMEOUT_S": "1",
    "TAGPIPE_CONVERGE_RETRY_S": "2",
    "TAGPIPE_STREAM_DELETE_RETRIES": "3",
    "TAGPIPE_STREAM_DELETE_RETRY_S": "1",
    # Failover within the e2e bounds (Lease held within 20 s of a kill -9, replicas up
    # within 30 s): a standby takes over ~8-10 s after the last renewal; the leader
    # steps down after 5 s without one, well before that.
    "TAGPIPE_LEASE_DURATION_S": "8",
    "TAGPIPE_LEASE_RENEW_S": "1",
    "TAGPIPE_LEASE_RENEW_DEADLINE_S": "5",
}


def _skip_reason() -> str | None:
    kubeconfig = os.environ.get("KUBECONFIG", "")
    if not kubeconfig or not all(Path(p).is_file() for p in kubeconfig.split(os.pathsep)):
        return "e2e needs KUBECONFIG pointing at a cluster's kubeconfig file (make e2e sets it)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason and os.environ.get("TAGPIPE_E2E_REQUIRED") == "1":
        raise pytest.UsageError(f"TAGPIPE_E2E_REQUIRED=1 but {reason}")
    for item in items:
        item.add_marker(pytest.mark.e2e)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def run_dir() -> Iterator[Path]:
    """This session's scratch space under .tagpipe/e2e/ (several runs may share the tree):
    operator logs, token kubeconfigs, NATS data. TAGPIPE_E2E_KEEP=1 keeps it."""
    path = ROOT / ".tagpipe" / "e2e" / f"pytest-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    yield path
    if os.environ.get("TAGPIPE_E2E_KEEP") != "1":
        shutil.rmtree(path, ignore_errors=True)


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
        patch = {"spec": body["spec"]}
        await eventually(
            lambda: kube.request(
                "PATCH", f"{CRD_PATH}/{name}", patch, "application/merge-patch+json"
            )
        )

    async def established() -> bool:
        got = await kube.request("GET", f"{CRD_PATH}/{name}")
        return any(
            c.get("type") == "Established" and c.get("status") == "True" for c in conditions(got)
        )

    await eventually(established, within=30)
    return body


async def _drop_finalizers(kube: KubeClient, ns: str) -> None:
    """A test that failed may leave a TagPipeline whose finalizer nobody will remove
    (its operator has stopped): drop it so the namespace can go."""
    listing = await kube.request("GET", TP_PATH.format(ns=ns))
    for item in listing.get("items") or []:
        try:
            await kube.patch(
                "TagPipeline", ns, item["metadata"]["name"], {"metadata": {"finalizers": None}}
            )
        except ApiError as exc:
            if exc.status != 404:  # deleted in between: nothing to release
                raise


@pytest.fixture
async def namespace(kube: KubeClient, crd: dict[str, Any]) -> AsyncIterator[str]:
    ns = f"tagpipe-e2e-{uuid.uuid4().hex[:6]}"
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    await kube.request("POST", "/api/v1/namespaces", body)
    yield ns
    await _drop_finalizers(kube, ns)
    await kube.request("DELETE", f"/api/v1/namespaces/{ns}")


@pytest.fixture(scope="session")
def operator_release(run_dir: Path) -> Iterator[tuple[Path, str, str]]:
    """The chart installed with default values: (a kubeconfig holding its ServiceAccount's
    token, the release namespace, where the operators' Lease lives, the release name).

    The chart's RBAC is what the operator gets, no more: a call it does not grant is a
    403 in the operator's log, which fails the test (see `operator`).
    """
    release, ns = f"op{uuid.uuid4().hex[:6]}", f"tagpipe-e2e-op-{uuid.uuid4().hex[:6]}"
    run(
        "helm", "install", release, str(ROOT / "charts" / "tagpipe"), "-n", ns, "--create-namespace"
    )
    sa = f"{release}-tagpipe-operator"
    token = _token(ns, sa)
    yield token_kubeconfig(admin_kubeconfig(), token, run_dir / f"{sa}.kubeconfig"), ns, release
    run("helm", "uninstall", release, "-n", ns, check=False)
    run("kubectl", "delete", "namespace", ns, "--wait=false", check=False)


def _token(ns: str, sa: str, within: float = 30.0) -> str:
    """A token for the ServiceAccount, asked again while a just-made one settles."""
    deadline = time.monotonic() + within
    while True:
        out = run("kubectl", "-n", ns, "create", "token", sa, "--duration", "2h", check=False)
        if out.strip() or time.monotonic() > deadline:
            assert out.strip(), f"no token for {ns}/{sa} within {within}s"
            return out.strip()
        time.sleep(1)


@pytest.fixture(scope="session")
def operator_kubeconfig(operator_release: tuple[Path, str, str]) -> Path:
    return operator_release[0]


@pytest.fixture
def start_operator(
    operator_release: tuple[Path, str, str], run_dir: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """start_operator(namespace, **env) -> a running operator watching that namespace.

    Each is a replica as the chart runs it: POD_NAME and POD_NAMESPACE (the release's)
    as the downward API gives them, electing a leader through a Lease named after the
    watched namespace (so tests never wait on another test's Lease). The chart's Secret
    reads are bound per namespace (`operator.secretNamespaces`); the namespaces here are
    made per test, so this binds the chart's `-secrets` ClusterRole in the watched one as
    that value would. Every operator started is stopped at teardown, and its log must
    hold no 403.
    """
    kubeconfig, release_ns, release = operator_release
    started: list[OperatorProcess] = []
    bound: list[str] = []

    def start(namespace: str, **env: str) -> OperatorProcess:
        if namespace not in bound:
            _bind_secret_reads(release, release_ns, namespace)
            bound.append(namespace)
        n = len(started)
        log = run_dir / f"operator-{namespace}-{n}.log"
        identity = {
            "POD_NAME": f"operator-{namespace}-{n}",
            "POD_NAMESPACE": release_ns,
            "TAGPIPE_LEASE_NAME": f"tagpipe-operator-{namespace}",
        }
        proc = OperatorProcess(kubeconfig, namespace, log, {**OPERATOR_SETTINGS, **identity, **env})
        started.append(proc.start())
        return proc

    yield start
    for proc in started:
        proc.stop()
    for namespace in bound:
        role = f"{release}-tagpipe-operator-secrets"
        run("kubectl", "-n", namespace, "delete", "rolebinding", role, check=False)
    for proc in started:
        assert not proc.forbidden(), "the chart's RBAC refused a call:\n" + "\n".join(
            proc.forbidden()[:5]
        )


def _bind_secret_reads(release: str, release_ns: str, namespace: str) -> None:
    role = f"{release}-tagpipe-operator-secrets"
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": role, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": f"{release}-tagpipe-operator",
                "namespace": release_ns,
            }
        ],
    }
    run("kubectl", "apply", "-f", "-", stdin=json.dumps(binding))


@pytest.fixture
def operator(start_operator: Callable[..., OperatorProcess], namespace: str) -> OperatorProcess:
    """The operator, as its own process, watching the test's namespace only."""
    return start_operator(namespace)


@pytest.fixture(scope="session")
def nats_url(run_dir: Path) -> Iterator[str]:
    if url := os.environ.get("TAGPIPE_E2E_NATS_URL"):
        yield url
        return
    srv = nats_server(run_dir / "nats").start()
    yield srv.url
    srv.stop()


@pytest.fixture
def own_nats(run_dir: Path) -> Iterator[ServerProcess]:
    """A NATS of the test's own, which it may stop and restart (same port, same data)."""
    srv = nats_server(run_dir / f"nats-{uuid.uuid4().hex[:6]}").start()
    yield srv
    srv.stop()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect_nats([u.strip() for u in nats_url.split(",")], "tagpipe-e2e")
    yield client
    await client.close()
