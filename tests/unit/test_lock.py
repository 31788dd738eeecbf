"""The hashed locks (requirements/*.txt, `make lock`) agree with pyproject.toml.

Every install (make setup, CI, the images) reads a lock, never pyproject's ranges, so a
dependency added to pyproject without `make lock` would be silently missing. These tests
fail until the lock is regenerated.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
REQ = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Installed on its own from requirements/torch.txt, never in a hashed lock.
UNLOCKED = {"torch"}
# Each lock and the extras it was compiled from (tools/lock.sh).
LOCKS = {
    "dev.txt": ["dev"],
    "gateway.txt": ["gateway"],
    "downloader.txt": ["downloader"],
    "operator.txt": ["operator"],
    "inference.txt": ["inference"],
    "inference-gpu.txt": ["inference-gpu"],
    "model.txt": ["model", "inference"],
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")
# The images' and CI's Python; a lock entry whose marker excludes it is not installed. The
# GPU lock is resolved for its CUDA base's Python instead (Ubuntu 24.04: 3.12).
ENV = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux"}
GPU_ENV = {"python_version": "3.12", "python_full_version": "3.12.3"}


def requirements(extras: list[str]) -> list[Requirement]:
    """pyproject's requirements of the base set plus `extras`, self-references expanded."""
    project = PYPROJECT["project"]
    out = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["optional-dependencies"][extra]:
            req = Requirement(text)
            if req.name == project["name"]:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def pins(path: Path) -> dict[str, list[tuple[Version, str | None]]]:
    found: dict[str, list[tuple[Version, str | None]]] = {}
    for line in path.read_text().splitlines():
        if m := PIN.match(line):
            name = canonicalize_name(m.group(1))
            found.setdefault(name, []).append((Version(m.group(2)), m.group(3)))
    return found


def applies(marker: str | None, extra_env: dict[str, str] | None = None) -> bool:
    return marker is None or Marker(marker).evaluate({**ENV, **(extra_env or {})})


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_pyproject_requirement_is_pinned_in_range(lock: str) -> None:
    path = REQ / lock
    assert path.exists(), f"{path} is missing: run `make lock`"
    locked = pins(path)
    env = GPU_ENV if lock == "inference-gpu.txt" else {}
    problems = []
    for req in requirements(LOCKS[lock]):
        name = canonicalize_name(req.name)
        if name in UNLOCKED or not applies(str(req.marker) if req.marker else None, env):
            continue
        versions = [v for v, m in locked.get(name, []) if applies(m, env)]
        if not versions:
            problems.append(f"{req} is not in the lock")
        elif not all(req.specifier.contains(v, prereleases=True) for v in versions):
            problems.append(f"{req}: locked {versions}")
    assert not problems, f"{lock} disagrees with pyproject.toml (run `make lock`): {problems}"


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_locks_are_hashed_and_leave_torch_out(lock: str) -> None:
    text = (REQ / lock).read_text()
    assert "make lock" in text.splitlines()[1], "written by tools/lock.sh"
    locked = pins(REQ / lock)
    assert not UNLOCKED & locked.keys()
    entries = re.findall(
        r"^[A-Za-z0-9][^\s]*==[^\n]*\n((?:\s+--hash=sha256:[0-9a-f]{64}.*\n)+)", text, re.M
    )
    assert len(entries) == sum(len(v) for v in locked.values()), "every pin carries hashes"


def test_one_version_per_package_across_locks() -> None:
    """The CPU image locks are compiled under dev.txt's constraints: no drift between them
    (the GPU lock is not: DALI caps `packaging` below dev's, and never meets the dev set)."""
    dev = pins(REQ / "dev.txt")
    for lock in set(LOCKS) - {"inference-gpu.txt"}:
        for name, entries in pins(REQ / lock).items():
            if name in dev:
                assert {v for v, _ in entries} <= {v for v, _ in dev[name]}, (lock, name)


def test_torch_pin_matches_the_model_extra() -> None:
    model = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["model"]]
    (torch,) = [r for r in model if r.name == "torch"]
    lines = [x for x in (REQ / "torch.txt").read_text().splitlines() if x and x[0] != "#"]
    assert lines == [f"torch{torch.specifier}"]
