"""The Helm chart lints, renders and every rendered manifest is one the API server accepts.

helm is the real helm v4 from `make tools` (.bin/helm). Manifests are validated offline
against the Kubernetes 1.30 OpenAPI schemas shipped by kubernetes-validate (strict: an
unknown field is an error), and the example TagPipeline against the CRD's own schema.
Security defaults and the operator's RBAC are checked on what helm actually renders.
"""

from __future__ import annotations

import functools
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from tagpipe_operator import rbac
from tagpipe_operator.settings import OperatorSettings

from tests.tools import ROOT, helm_binary

CHART = ROOT / "charts" / "tagpipe"
CRD_FILE = ROOT / "crds" / "tagpipelines.tagpipe.io.yaml"
K8S_VERSION = "1.30"
# No schema ships offline for the Prometheus Operator's CRDs; their shapes are checked below
# (the PodMonitor in test_observability_dashboard.py).
NO_OFFLINE_SCHEMA = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}
VALUES = {
    "default": [],
    "full": ["-f", str(CHART / "ci" / "full-values.yaml")],
    "kind": ["-f", str(CHART / "ci" / "kind-values.yaml")],
}
Manifest = dict[str, Any]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)


@functools.cache
def _render(*args: str) -> tuple[Manifest, ...]:
    proc = helm("template", "rel", str(CHART), "--namespace", "tp", "--include-crds", *args)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(case: str, *extra: str) -> tuple[Manifest, ...]:
    return _render(*VALUES[case], *extra)


def of_kind(docs: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[Manifest, ...], kind: str, name_part: str = "") -> Manifest:
    found = [d for d in of_kind(docs, kind) if name_part in d["metadata"]["name"]]
    assert len(found) == 1, f"{kind} *{name_part}*: {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_specs(docs: tuple[Manifest, ...]) -> list[tuple[str, Manifest]]:
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((name, d["spec"]["template"]["spec"]))
        elif d["kind"] == "Pod":
            out.append((name, d["spec"]))
    return out


@pytest.mark.parametrize("case", VALUES)
def test_helm_lint_strict(case: str) -> None:
    proc = helm("lint", "--strict", str(CHART), *VALUES[case])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", VALUES)
def test_every_manifest_validates_against_kubernetes_schemas(case: str) -> None:
    docs = render(case)
    checked = 0
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in NO_OFFLINE_SCHEMA or doc["kind"] == "TagPipeline":
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        checked += 1
    assert checked >= 8


def test_service_monitor_selects_the_operator_metrics_service() -> None:
    docs = render("full")
    monitor = one(docs, "ServiceMonitor")
    svc = one(docs, "Service", "operator-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


CRD_IN_CHART = f"files/crds/{CRD_FILE.name}"
CRD_HOOK = {
    "helm.sh/hook": "pre-install,pre-upgrade",
    "helm.sh/hook-weight": "-20",
    "helm.sh/resource-policy": "keep",
}


def test_crd_in_chart_is_the_one_in_crds() -> None:
    link = CHART / CRD_IN_CHART
    assert link.is_symlink() and link.resolve() == CRD_FILE.resolve()
    rendered = one(render("default"), "CustomResourceDefinition")
    annotations = rendered["metadata"].pop("annotations")
    assert rendered == yaml.safe_load(CRD_FILE.read_text())
    # A hook, so that every install and upgrade applies it (Helm never upgrades crds/),
    # kept, so that no uninstall takes every TagPipeline with it.
    assert annotations == CRD_HOOK
    assert not (CHART / "crds").exists(), "crds/ would install a second, never-upgraded copy"


def test_the_crd_hook_runs_before_every_other_hook() -> None:
    docs = render("kind")
    hooks = [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    others = [h for h in hooks if h["kind"] != "CustomResourceDefinition"]
    assert others, "the kind values render other hooks to order against"
    weights = [int(h["metadata"]["annotations"].get("helm.sh/hook-weight", "0")) for h in others]
    assert min(weights) > int(CRD_HOOK["helm.sh/hook-weight"])


def test_packaged_chart_carries_the_crd_and_rbac_contents(tmp_path: Path) -> None:
    proc = helm("package", str(CHART), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (tgz,) = tmp_path.glob("tagpipe-*.tgz")
    with tarfile.open(tgz) as tar:
        member = tar.getmember(f"tagpipe/{CRD_IN_CHART}")
        assert member.isfile(), "the package must hold the CRD's contents, not a link"
        data = tar.extractfile(member)
        assert data is not None and data.read() == CRD_FILE.read_bytes()
        assert "tagpipe/files/operator-rbac.yaml" in tar.getnames()


def test_example_tagpipeline_validates_against_the_crd_schema() -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for case in ("full", "kind"):
        example = one(render(case), "TagPipeline")
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(example))
        assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    assert not of_kind(render("default"), "TagPipeline")


def test_example_points_at_this_release() -> None:
    spec = one(render("kind"), "TagPipeline")["spec"]
    assert spec["nats"] == {"url": "nats://rel-tagpipe-nats:4222", "prefix": "photos"}
    assert spec["redis"] == {"url": "redis://rel-tagpipe-redis:6379/0"}
    assert spec["model"]["storageUri"] == "pvc://rel-tagpipe-models/efficientnet-lite0"
    assert "apiKeySecretRef" not in spec["gateway"]
    assert spec["inference"]["gpu"] == 0
    assert spec["gateway"]["image"] == "tagpipe/gateway:0.1.0"
    full = one(render("full"), "TagPipeline")["spec"]
    assert full["redis"]["credentialsSecretRef"] == {"name": "tagpipe-redis", "key": "url"}
    assert full["gateway"]["apiKeySecretRef"] == {"name": "tagpipe-api-keys", "key": "keys"}
    assert full["inference"]["image"] == "registry.example.com/tagpipe/inference:0.1.0-rc1"


def test_operator_runs_two_replicas_rolling_with_a_pdb_and_its_pod_identity() -> None:
    docs = render("default")
    dep = one(docs, "Deployment", "operator")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    pdb = one(docs, "PodDisruptionBudget", "operator")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("case", VALUES)
def test_strict_security_defaults_on_every_pod(case: str) -> None:
    specs = pod_specs(render(case))
    assert specs
    for name, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # Only the operator talks to the Kubernetes API.
        assert spec["automountServiceAccountToken"] is ("-operator" in name), name
        for ctr in spec["containers"]:
            sc = ctr["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(ctr["resources"]["requests"]), name
            assert "memory" in ctr["resources"]["limits"], name


def test_service_account_token_not_automounted_by_default() -> None:
    sa = one(render("default"), "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False


def test_config_checksum_rolls_pods_when_config_changes() -> None:
    def checksum(*extra: str) -> str:
        dep = one(render("default", *extra), "Deployment", "operator")
        value: str = dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    assert len(checksum()) == 64
    assert checksum() != checksum("--set", "operator.logLevel=DEBUG")
    nats = one(render("kind"), "StatefulSet", "nats")
    assert "checksum/config" in nats["spec"]["template"]["metadata"]["annotations"]


def test_cluster_role_is_the_operators_rules_bound_to_its_account() -> None:
    docs = render("default")
    roles = {
        d["metadata"]["name"].rsplit("operator", 1)[1]: d for d in of_kind(docs, "ClusterRole")
    }
    role = roles[""]
    assert role["rules"] == [dict(r) for r in rbac.RULES]
    assert roles["-secrets"]["rules"] == [dict(r) for r in rbac.SECRET_RULES]
    leader = one(docs, "Role", "operator-leader")
    assert leader["rules"] == [dict(r) for r in rbac.LEASE_RULES]
    # Secrets: RoleBindings only (the release namespace by default), no cluster-wide one.
    secret_bindings = [
        d
        for d in docs
        if d["kind"].endswith("Binding") and d["roleRef"]["name"].endswith("-secrets")
    ]
    assert [(d["kind"], d["metadata"]["namespace"]) for d in secret_bindings] == [
        ("RoleBinding", "tp")
    ]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "tp"}
    ]
    dep = one(docs, "Deployment", "operator")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert not of_kind(render("default", "--set", "rbac.create=false"), "ClusterRole")


def test_network_policy_opens_only_the_gateway_port() -> None:
    policies = of_kind(render("kind"), "NetworkPolicy")
    assert {p["spec"]["policyTypes"][0] for p in policies} == {"Ingress"}
    gateway = one(tuple(policies), "NetworkPolicy", "gateway")
    assert gateway["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert gateway["spec"]["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]
    internal = one(tuple(policies), "NetworkPolicy", "internal")
    (rule,) = internal["spec"]["ingress"]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "tagpipe"}}}
    ]
    assert not of_kind(render("default"), "NetworkPolicy")


def test_bundled_nats_keeps_jetstream_on_a_pvc() -> None:
    docs = render("kind")
    sts = one(docs, "StatefulSet", "nats")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    conf = one(docs, "ConfigMap", "nats")["data"]["nats.conf"]
    assert "store_dir: /data" in conf and "max_payload: 8MB" in conf
    assert not [d for d in render("default") if "nats" in d["metadata"]["name"]]


def test_helm_test_pod_calls_gateway_readyz() -> None:
    pod = one(render("kind"), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["command"][-1]
    assert "http://ci-gateway.tp.svc:80/readyz/dependencies" in script


def test_values_schema_refuses_unsafe_or_unknown_values() -> None:
    for bad in (
        "operator.containerSecurityContext.privileged=true",
        "operator.podSecurityContext.runAsNonRoot=false",
        "images.pullPolicy=Sometimes",
        "externalNats.url=http://nats:4222",
        "nats.enabledd=true",
    ):
        proc = helm("template", "rel", str(CHART), "--set", bad)
        assert proc.returncode != 0, bad
        assert "schema" in proc.stderr, proc.stderr


def test_dashboard_configmap_only_when_enabled_and_file_present() -> None:
    has_file = (CHART / "files" / "dashboard.json").is_file()
    names = [d["metadata"]["name"] for d in of_kind(render("full"), "ConfigMap")]
    assert any("dashboard" in n for n in names) is has_file
    assert not [n for n in map(str, render("default")) if "grafana_dashboard" in n]


def test_operator_config_keys_are_operator_settings() -> None:
    docs = render("full")
    data = one(docs, "ConfigMap", "config")["data"]
    fields = set(OperatorSettings.model_fields)
    for key in data:
        assert key.startswith("TAGPIPE_") and key[8:].lower() in fields, key
    # The settings parse (as the operator's main() would) and open the ports the pod declares.
    settings = OperatorSettings(**{k[8:].lower(): v for k, v in data.items()})
    ctr = one(docs, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ports == {"metrics": settings.metrics_port, "health": settings.health_port}
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_model_is_seeded_before_the_pipeline_mounts_it() -> None:
    docs = render("kind")
    pvc, job = one(docs, "PersistentVolumeClaim", "models"), one(docs, "Job", "seed")
    pvc_notes, job_notes = pvc["metadata"]["annotations"], job["metadata"]["annotations"]
    # Hooks run before the release's ordinary resources (the TagPipeline), by weight.
    assert pvc_notes["helm.sh/hook"] == "pre-install"
    assert pvc_notes["helm.sh/resource-policy"] == "keep"
    assert "pre-install" in job_notes["helm.sh/hook"].split(",")
    assert int(pvc_notes["helm.sh/hook-weight"]) < int(job_notes["helm.sh/hook-weight"])
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    uri = one(docs, "TagPipeline")["spec"]["model"]["storageUri"]
    assert claim == pvc["metadata"]["name"] and uri == f"pvc://{claim}/efficientnet-lite0"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"].endswith("inference:0.1.0")


def test_bundled_redis_with_sentinel_runs_three_nodes_and_names_them_all() -> None:
    docs = render("kind", "--set", "redis.sentinel.enabled=true")
    sts = one(docs, "StatefulSet", "redis")
    assert sts["spec"]["replicas"] == 3
    pod_spec = sts["spec"]["template"]["spec"]
    assert [c["name"] for c in pod_spec["containers"]] == ["redis", "sentinel"]
    svc = one(docs, "Service", "redis")
    assert svc["spec"]["clusterIP"] == "None"  # pod names, never a load-balanced primary
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    url = one(docs, "TagPipeline")["spec"]["redis"]["url"]
    hosts = url.removeprefix("redis+sentinel://").split("/")[0].split(",")
    assert hosts == [
        f"{sts['metadata']['name']}-{i}.{svc['metadata']['name']}.tp.svc:26379" for i in range(3)
    ]
    assert url.endswith("/tagpipe/0")
    for name, script in one(docs, "ConfigMap", "redis-sentinel")["data"].items():
        proc = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True)
        assert proc.returncode == 0, (name, proc.stderr)
    assert one(render("kind"), "StatefulSet", "redis")["spec"]["replicas"] == 1  # the default


def test_bundled_nats_cluster_runs_three_routed_servers_and_names_them_all() -> None:
    docs = render("kind", "--set", "nats.cluster.enabled=true")
    sts = one(docs, "StatefulSet", "nats")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    headless = one(docs, "Service", "nats-headless")
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]}["cluster"] == 6222
    name, svc = sts["metadata"]["name"], headless["metadata"]["name"]
    pods = [f"{name}-{i}.{svc}.tp.svc" for i in range(3)]
    conf = one(docs, "ConfigMap", "nats")["data"]["nats.conf"]
    assert "server_name: $SERVER_NAME" in conf and "name: tagpipe" in conf
    assert all(f"nats://{p}:6222" in conf for p in pods), conf
    assert one(docs, "PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1
    nats = one(docs, "TagPipeline")["spec"]["nats"]
    assert nats["url"] == ",".join(f"nats://{p}:4222" for p in pods)
    assert nats["streamReplicas"] == 3
    for doc in docs:  # the cluster's objects are ones the API server accepts
        if doc["kind"] in ("StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(one(docs, "TagPipeline")))
    single = render("kind")  # the default stays one server, R1
    assert one(single, "StatefulSet", "nats")["spec"]["replicas"] == 1
    assert "cluster {" not in one(single, "ConfigMap", "nats")["data"]["nats.conf"]
    assert not [
        d for d in of_kind(single, "PodDisruptionBudget") if "nats" in d["metadata"]["name"]
    ]


def _sentinel_pod(tmp: Path, host: str, named: str) -> dict[str, str]:
    """The rendered start scripts under `tmp`, with redis-cli, redis-server and hostname
    stubbed: `named` is what every sentinel answers for the primary ('' = none up).
    Returns the environment to run them in; redis-server writes its argv to tmp/exec."""
    docs = render("kind", "--set", "redis.sentinel.enabled=true")
    scripts = one(docs, "ConfigMap", "redis-sentinel")["data"]
    for d in ("scripts", "bin", "data", "sentinel"):
        (tmp / d).mkdir(exist_ok=True)
    for key, text in scripts.items():
        for path in ("/scripts/", "/data/", "/sentinel/"):
            text = text.replace(path, f"{tmp}{path}")
        (tmp / "scripts" / key).write_text(text)
    stubs = {
        "hostname": f"echo {host}",
        "redis-cli": f'[ -n "{named}" ] && echo "{named}" && echo 6379',
        "redis-server": f'echo "$@" > {tmp}/exec',
        "timeout": 'shift; "$@"',
    }
    for cmd, body in stubs.items():
        stub = tmp / "bin" / cmd
        stub.write_text(f"#!/bin/sh\n{body}\n")
        stub.chmod(0o755)
    return {"PATH": f"{tmp}/bin:/usr/bin:/bin"}


def _run_sentinel_script(tmp: Path, name: str, host: str, named: str) -> str:
    env = _sentinel_pod(tmp, host, named)
    subprocess.run(["sh", str(tmp / "scripts" / name)], env=env, timeout=20, check=True)
    return (tmp / "exec").read_text()


@pytest.mark.parametrize(
    ("host", "named", "replica_of"),
    [
        ("rel-tagpipe-redis-0", "", None),  # first start: pod 0 is the primary
        ("rel-tagpipe-redis-1", "", "rel-tagpipe-redis-0"),
        ("rel-tagpipe-redis-0", "rel-tagpipe-redis-2", "rel-tagpipe-redis-2"),  # failed over
    ],
)
def test_sentinel_start_script_follows_the_primary_the_sentinels_name(
    tmp_path: Path, host: str, named: str, replica_of: str | None
) -> None:
    domain = "rel-tagpipe-redis.tp.svc"
    named = f"{named}.{domain}" if named else ""
    argv = _run_sentinel_script(tmp_path, "redis.sh", host, named)
    assert f"--replica-announce-ip {host}.{domain}" in argv
    if replica_of is None:
        assert "--replicaof" not in argv
    else:
        assert f"--replicaof {replica_of}.{domain} 6379" in argv
    _run_sentinel_script(tmp_path, "sentinel.sh", host, named)
    conf = (tmp_path / "sentinel" / "sentinel.conf").read_text()
    primary = f"{replica_of or host}.{domain}"
    assert f"sentinel monitor tagpipe {primary} 6379 2" in conf


def test_an_empty_node_the_sentinels_still_call_primary_waits_for_a_failover(
    tmp_path: Path,
) -> None:
    """Back with no data before the sentinels noticed it was gone: serving as primary
    would make the replicas copy an empty data set."""
    me = "rel-tagpipe-redis-0.rel-tagpipe-redis.tp.svc"
    env = _sentinel_pod(tmp_path, "rel-tagpipe-redis-0", me)
    proc = subprocess.Popen(["sh", str(tmp_path / "scripts" / "redis.sh")], env=env)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(3)  # holding back (it asks again every 2 s)
        assert not (tmp_path / "exec").exists()
        (tmp_path / "data" / "appendonlydir").mkdir()  # a node that kept its data starts
        assert proc.wait(10) == 0
    finally:
        proc.kill()
    assert "--replicaof" not in (tmp_path / "exec").read_text()


def test_bundled_nats_gets_a_go_memory_limit_below_its_pod_limit() -> None:
    def env_of(*extra: str) -> dict[str, str]:
        sts = one(render("kind", *extra), "StatefulSet", "nats")
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value", "") for e in c.get("env", [])}

    assert env_of()["GOMEMLIMIT"] == "460MiB"
    clustered = env_of("--set", "nats.cluster.enabled=true", "--set", "nats.goMemLimit=1GiB")
    assert clustered["GOMEMLIMIT"] == "1GiB" and "SERVER_NAME" in clustered
    assert "GOMEMLIMIT" not in env_of("--set", "nats.goMemLimit=")
