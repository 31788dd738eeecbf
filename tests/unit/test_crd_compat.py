"""No field leaves the CRD in one step: every field an earlier CRD served is still in this
one (deprecated, with spec.map_deprecated reading it as its successor, if it was
replaced), so a manifest that worked then is still accepted, not pruned or refused.

The baselines are earlier commits' crds/ (git history: a clean clone has it).
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.tools import ROOT

CRD_PATH = "crds/tagpipelines.tagpipe.io.yaml"
BASELINES = {
    # The last CRD with maxScaleUpStep, before it was replaced by scaleUpPolicies.
    "7da42f0^": "before scaleUpPolicies",
    # The CRD when issue 30 began (the chart e2e/test_upgrade_e2e.py upgrades from).
    "343c9ce": "before the upgrade hook",
}


def schema_at(rev: str) -> dict[str, Any]:
    proc = subprocess.run(
        ["git", "show", f"{rev}:{CRD_PATH}"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"git show {rev}: {proc.stderr.strip()} (a shallow clone?)"
    crd = yaml.safe_load(proc.stdout)
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def fields(node: dict[str, Any], path: str = "") -> dict[str, dict[str, Any]]:
    out = {path: node} if path else {}
    for key, child in node.get("properties", {}).items():
        out.update(fields(child, f"{path}.{key}"))
    if isinstance(node.get("items"), dict):
        out.update(fields(node["items"], f"{path}[]"))
    return out


NOW = fields(
    yaml.safe_load((ROOT / CRD_PATH).read_text())["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"
    ]
)


@pytest.mark.parametrize("rev", BASELINES, ids=list(BASELINES.values()))
def test_every_earlier_field_is_still_served_with_its_type(rev: str) -> None:
    then = fields(schema_at(rev))
    gone = sorted(set(then) - set(NOW))
    assert not gone, f"removed since {rev}: {gone} (keep them, marked Deprecated)"
    retyped = [p for p in then if then[p].get("type") != NOW[p].get("type")]
    assert not retyped, f"type changed since {rev}: {retyped}"


def test_the_restored_field_is_marked_deprecated() -> None:
    then = fields(schema_at("7da42f0^"))
    restored = [p for p in then if p.endswith(".maxScaleUpStep")]
    assert len(restored) == 3  # one per stage
    for path in restored:
        assert NOW[path]["description"].startswith("Deprecated:"), path
