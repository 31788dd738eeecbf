"""The one Dockerfile's target per component runs a console script that exists, as a
non-root user, from a build context that carries the sources and nothing heavy.

No Docker engine runs here, so the Dockerfile is checked as text against pyproject.toml,
the operator's rendered commands and .dockerignore (evaluated with Docker's rules: the
last matching pattern wins, `!` re-includes).
"""

from __future__ import annotations

import re
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
DOCKERFILE = ROOT / "Dockerfile"
COMPONENTS = ("gateway", "downloader", "inference", "operator")
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

    def stage(self, name: str) -> Stage:
        (found,) = [s for s in self.stages if s.name == name]
        return found

    def chain(self, stage: Stage) -> list[Stage]:
        """The stage and the earlier stages it is built FROM, nearest first."""
        names = {s.name for s in self.stages}
        out = [stage]
        while out[-1].base in names:
            out.append(self.stage(out[-1].base))
        return out

    def image(self, stage: Stage) -> str:
        """The registry image a stage starts from, through the stages it builds on."""
        return self.expand(self.chain(stage)[-1].base)


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


DF = parse(DOCKERFILE)


def pip_extras(df: Dockerfile, stage: Stage) -> set[str]:
    found = set()
    for line in (ln for s in df.chain(stage) for ln in s.lines):
        for m in re.finditer(r"pip install [^&]*?\"\.\[([^\]]+)\]\"", df.expand(line)):
            found |= {e.strip() for e in m[1].split(",")}
    return found


def entrypoint(df: Dockerfile, stage: Stage) -> list[str]:
    lines = [ln for s in df.chain(stage) for ln in s.lines if ln.startswith("ENTRYPOINT")]
    return re.findall(r'"([^"]+)"', lines[0])


def runtime_venv_stage(df: Dockerfile, target: Stage) -> Stage:
    """The stage whose /opt/venv the target copies."""
    (copy,) = [
        ln for s in df.chain(target) for ln in s.lines
        if "/opt/venv" in ln and ln.startswith("COPY")
    ]  # fmt: skip
    source = re.search(r"--from=(\S+)", copy)
    assert source is not None
    return df.stage(source[1])


def test_one_dockerfile_with_a_target_per_component() -> None:
    assert not [p for p in ROOT.glob("**/Dockerfile") if ".venv" not in p.parts and p != DOCKERFILE]
    for component in COMPONENTS:
        DF.stage(component)


@pytest.mark.parametrize("component", COMPONENTS)
def test_entrypoint_is_an_existing_console_script(component: str) -> None:
    (script,) = entrypoint(DF, DF.stage(component))
    assert script in SCRIPTS
    # The operator renders pods with `command: [<script>]`; it must be the image's own.
    assert script == COMMANDS.get(component, "tagpipe-operator")


@pytest.mark.parametrize("component", COMPONENTS)
def test_multi_stage_and_non_root(component: str) -> None:
    target = DF.stage(component)
    # The runtime image copies its venv from a build stage, so build tools stay behind.
    assert runtime_venv_stage(DF, target) not in DF.chain(target)
    users = [ln.split()[1] for s in DF.chain(target) for ln in s.lines if ln.startswith("USER ")]
    assert users, "final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root id (runAsNonRoot)"
    # The chart and the operator run these images as 10001.
    assert uid == "10001"


@pytest.mark.parametrize("component", ["gateway", "downloader", "operator"])
def test_python_slim_base(component: str) -> None:
    target = DF.stage(component)
    assert DF.image(target) == f"{SLIM}-bookworm"
    assert DF.image(runtime_venv_stage(DF, target)) == f"{SLIM}-bookworm"


def test_inference_image_bakes_the_model_built_at_image_build_time() -> None:
    target = DF.stage("inference")
    # Its venv is built on the inference base, so the venv's python is the image's python.
    assert DF.image(runtime_venv_stage(DF, target)) == DF.image(target)
    model = DF.stage("model")
    assert any("requirements/model.txt" in ln for ln in DF.chain(model)[0].lines)
    assert any("build_model.py --out /models/efficientnet-lite0" in ln for ln in model.lines)
    assert (ROOT / "services" / "inference" / "build_model.py").is_file()
    assert any(ln.startswith("COPY --from=model") for ln in target.lines)
    assert "TAGPIPE_MODEL_DIR=/models/efficientnet-lite0" in " ".join(target.lines)


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


def test_make_images_builds_each_target_under_its_chart_name() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\nimages:") :].split("\n\n")[0]
    for component in COMPONENTS:
        built = rf"\$\(IMAGE_BUILD\) --target {component} .*-t \$\(IMAGE_PREFIX\){component}:"
        assert re.search(built, recipe), component
