"""The e2e workflow installs what the chart and `make images` actually produce.

GitHub Actions cannot run here, so this checks the workflow's names against the chart
rendered with the workflow's own release name and values: the Services it port-forwards,
the images it loads, the pipeline it waits for.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import yaml

from tests.tools import ROOT, helm_binary

WORKFLOW = ROOT / ".github" / "workflows" / "e2e.yaml"


def _workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def _job() -> dict[str, Any]:
    (job,) = _workflow()["jobs"].values()
    return dict(job)


def _script() -> str:
    return "\n".join(str(step.get("run", "")) for step in _job()["steps"])


def _render_like_the_workflow() -> list[dict[str, Any]]:
    env = _job()["env"]
    install = re.search(r"helm install .*?(?=\n\s*\.bin/kubectl|\Z)", _script(), re.S)
    assert install is not None
    values = re.findall(r"-f (\S+)", install[0])
    assert values == ["charts/tagpipe/ci/kind-values.yaml"]
    cmd = [helm_binary(), "template", env["RELEASE"], str(ROOT / "charts" / "tagpipe")]
    cmd += ["--namespace", env["NAMESPACE"], "-f", str(ROOT / values[0])]
    cmd += ["--set", "images.tag=test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_triggers_and_kind_cluster() -> None:
    wf = _workflow()
    # PyYAML reads the bare key `on` as True.
    triggers = wf.get("on", wf.get(True))
    assert {"push", "pull_request"} <= set(triggers)
    uses = [step.get("uses", "") for step in _job()["steps"]]
    assert any(u.startswith("helm/kind-action@") for u in uses)


def test_port_forwards_reach_services_the_chart_renders() -> None:
    env = _job()["env"]
    docs = _render_like_the_workflow()
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    nats_svc = f"{env['RELEASE']}-nats"
    assert nats_svc in services
    assert 'svc/$RELEASE-nats" 4222:4222' in _script()
    (example,) = [d for d in docs if d["kind"] == "TagPipeline"]
    # The operator names the gateway Service <pipeline>-gateway, on spec.gateway.service.port.
    assert example["metadata"]["name"] == env["PIPELINE"]
    port = example["spec"]["gateway"]["service"]["port"]
    assert f'svc/$PIPELINE-gateway" 8080:{port}' in _script()
    assert example["spec"]["nats"]["url"] == f"nats://{nats_svc}:4222"


def test_loads_exactly_the_images_make_builds_and_the_chart_uses() -> None:
    env = _job()["env"]
    makefile = (ROOT / "Makefile").read_text()
    built = set(re.findall(r"-t \$\(IMAGE_PREFIX\)(\w+):\$\(IMAGE_TAG\)", makefile))
    assert built == {"operator", "gateway", "downloader", "inference"}
    assert "for c in operator gateway downloader inference; do" in _script()
    docs = _render_like_the_workflow()
    (example,) = [d for d in docs if d["kind"] == "TagPipeline"]
    for c in ("gateway", "downloader", "inference"):
        assert example["spec"][c]["image"] == f"{env['IMAGE_PREFIX']}{c}:test"
        assert example["spec"][c]["imagePullPolicy"] == "Never"
    (operator,) = [d for d in docs if d["kind"] == "Deployment"]
    image = operator["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{env['IMAGE_PREFIX']}operator:test"


def test_runs_make_e2e_with_the_nats_url_and_dumps_on_failure() -> None:
    steps = _job()["steps"]
    (e2e,) = [s for s in steps if "make e2e" in str(s.get("run", ""))]
    assert e2e["env"]["TAGPIPE_E2E_NATS_URL"] == "nats://127.0.0.1:4222"
    dumps = [s for s in steps if s.get("if") == "failure()"]
    text = "\n".join(str(s.get("run", "")) for s in dumps)
    assert "get events" in text and "logs" in text and "--previous" in text
    assert "helm test" in _script() and "make setup" in _script()
    # e2e/ runs the operator in-process; the chart's one must not handle the same objects.
    names = [str(s.get("name", "")) for s in steps]
    stop = next(i for i, s in enumerate(steps) if "--replicas=0" in str(s.get("run", "")))
    assert stop < names.index(e2e["name"])
    assert '"$RELEASE-operator"' in str(steps[stop]["run"])
