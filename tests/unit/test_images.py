"""Each Dockerfile installs an extra that exists and runs a console script that exists.

No Docker engine runs here, so the Dockerfiles are checked as text against pyproject.toml,
the operator's rendered commands and .dockerignore (evaluated with Docker's rules: the
last matching pattern wins, `!` re-includes).
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from tagpipe_operator.render import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
SCRIPTS = set(PYPROJECT["project"]["scripts"])
DOCKERFILES = {
    "gateway": ROOT / "services" / "gateway" / "Dockerfile",
    "downloader": ROOT / "services" / "downloader" / "Dockerfile",
    "inference": ROOT / "services" / "inference" / "Dockerfile",
    "operator": ROOT / "operator" / "Dockerfile",
}
SLIM = "python:3.11-slim"


@dataclass
class Stage:
    base: str
    name: str | None
    lines: list[str] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.args.get(m[1], m[0]), text)

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse(path: Path) -> Dockerfile:
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.match(r"ARG (\w+)=(\S+)$", line):
            args.setdefault(m[1], m[2])
        if m := re.match(r"FROM (\S+)(?: AS (\S+))?$", line, re.IGNORECASE):
            stages.append(Stage(base=m[1], name=m[2]))
        elif stages:
            stages[-1].lines.append(line)
    return Dockerfile(args, stages)


def pip_extras(df: Dockerfile, stage: Stage) -> set[str]:
    found = set()
    for line in stage.lines:
        for m in re.finditer(r"pip install [^&]*?\"\.\[([^\]]+)\]\"", df.expand(line)):
            found |= {e.strip() for e in m[1].split(",")}
    return found


def entrypoint(stage: Stage) -> list[str]:
    (line,) = [ln for ln in stage.lines if ln.startswith("ENTRYPOINT")]
    return re.findall(r'"([^"]+)"', line)


def runtime_venv_stage(df: Dockerfile) -> Stage:
    """The stage whose /opt/venv the final stage copies."""
    (copy,) = [ln for ln in df.final.lines if "/opt/venv" in ln and ln.startswith("COPY")]
    source = re.search(r"--from=(\S+)", copy)
    assert source is not None
    (stage,) = [s for s in df.stages if s.name == source[1]]
    return stage


@pytest.mark.parametrize("component", DOCKERFILES)
def test_installs_only_its_own_existing_extra(component: str) -> None:
    df = parse(DOCKERFILES[component])
    extras = pip_extras(df, runtime_venv_stage(df))
    expected = {"inference": {"inference-gpu"}}.get(component, {component})
    assert extras == expected
    assert extras <= EXTRAS


@pytest.mark.parametrize("component", DOCKERFILES)
def test_entrypoint_is_an_existing_console_script(component: str) -> None:
    df = parse(DOCKERFILES[component])
    (script,) = entrypoint(df.final)
    assert script in SCRIPTS
    # The operator renders pods with `command: [<script>]`; it must be the image's own.
    assert script == COMMANDS.get(component, "tagpipe-operator")


@pytest.mark.parametrize("component", DOCKERFILES)
def test_multi_stage_and_non_root(component: str) -> None:
    df = parse(DOCKERFILES[component])
    assert len(df.stages) >= 2
    users = [ln.split()[1] for ln in df.final.lines if ln.startswith("USER ")]
    assert users, "final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root id (runAsNonRoot)"
    # The chart and the operator run these images as 10001.
    assert uid == "10001"


@pytest.mark.parametrize("component", ["gateway", "downloader", "operator"])
def test_python_slim_base(component: str) -> None:
    df = parse(DOCKERFILES[component])
    assert {df.expand(s.base) for s in df.stages} == {f"{SLIM}-bookworm"}


def test_inference_image_cuda_runtime_gpu_extra_and_baked_model() -> None:
    df = parse(DOCKERFILES["inference"])
    assert df.expand(df.final.base).startswith("nvidia/cuda:")
    assert "runtime" in df.expand(df.final.base)
    model = next(s for s in df.stages if s.name == "model")
    assert "model" in pip_extras(df, model)
    assert any("build_model.py --out /models/efficientnet-lite0" in ln for ln in model.lines)
    assert (ROOT / "services" / "inference" / "build_model.py").is_file()
    assert any(ln.startswith("COPY --from=model") for ln in df.final.lines)
    assert "TAGPIPE_MODEL_DIR=/models/efficientnet-lite0" in " ".join(df.final.lines)


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = re.escape(pat).replace(r"\*\*", "\0").replace(r"\*", "[^/]*").replace("\0", ".*")
        # A pattern that names a directory also covers everything below it.
        rules.append((negate, re.compile(f"^{rx}(/.*)?$")))
    return rules


def in_context(path: str) -> bool:
    included = True
    for negate, rx in _dockerignore():
        if rx.match(path):
            included = negate
    return included


def test_build_context_has_the_sources_and_nothing_heavy() -> None:
    packages = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    for pkg in packages:
        assert in_context(f"{pkg}/__init__.py"), pkg
        assert not in_context(f"{pkg}/__pycache__/x.cpython-311.pyc"), pkg
    for needed in ("pyproject.toml", "README.md", "services/inference/build_model.py"):
        assert in_context(needed), needed
    for heavy in (".venv/bin/python", ".bin/helm", "models/efficientnet-lite0/model.onnx",
                  ".git/HEAD", "tests/conftest.py", "bench/results/x.json"):  # fmt: skip
        assert not in_context(heavy), heavy


def test_make_images_fails_clearly_without_a_docker_engine(tmp_path: Path) -> None:
    # Point the client at a socket that does not exist, so `docker info` fails here and on CI.
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    proc = subprocess.run(
        ["make", "--no-print-directory", "images"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no Docker engine reachable" in proc.stderr
    assert "docker build" not in proc.stdout


def _make_variable(name: str) -> str:
    m = re.search(rf"^{name} \?= (\S*)$", (ROOT / "Makefile").read_text(), re.M)
    assert m is not None, name
    return m[1]


def test_crd_default_images_are_what_make_images_tags() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "tagpipelines.tagpipe.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    prefix, tag = _make_variable("IMAGE_PREFIX"), _make_variable("IMAGE_TAG")
    assert tag == PYPROJECT["project"]["version"]
    chart = yaml.safe_load((ROOT / "charts" / "tagpipe" / "Chart.yaml").read_text())
    assert chart["appVersion"] == tag  # the chart's default image tag
    for component in ("gateway", "downloader", "inference"):
        default = spec["properties"][component]["properties"]["image"]["default"]
        assert default == f"{prefix}{component}:{tag}"
