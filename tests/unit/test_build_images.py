"""`make images` and `make base-image` say which command fixes a missing engine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_without_engines(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The script on a PATH holding only the tools it needs besides the engines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "timeout", "id", "grep"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return subprocess.run(
        [
            str(bin_dir / "bash"),
            str(ROOT / script),
            *([] if "base" in script else ["--variant", "cpu"]),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_images_without_docker_or_podman_names_the_setup(tmp_path: Path) -> None:
    proc = run_without_engines("tools/build-images.sh", tmp_path)
    assert proc.returncode == 1
    assert "no Docker engine and no podman" in proc.stderr
    assert "make podman-setup" in proc.stderr


def test_base_image_without_podman_names_the_setup(tmp_path: Path) -> None:
    proc = run_without_engines("tools/base-image.sh", tmp_path)
    assert proc.returncode == 1
    assert "podman is not installed; run: tools/podman-setup.sh" in proc.stderr


@pytest.mark.parametrize("variant", ["arm", ""])
def test_images_refuses_an_unknown_variant(variant: str) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "tools/build-images.sh"), "--variant", variant],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "ENGINE": "none"},
    )
    assert proc.returncode == 2
    assert "--variant is cpu or gpu" in proc.stderr


@pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (make podman-setup)")
def test_images_without_a_pullable_or_local_base_names_make_base_image() -> None:
    env = {
        **os.environ,
        "ENGINE": "podman",
        "REGISTRY_PYTHON": "localhost/tagpipe-test/no-such-python:0",  # never pullable
        "BASE_IMAGE": "localhost/tagpipe-test/no-such-base:0",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "tools/build-images.sh"), "--variant", "cpu", "--target", "gateway"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 1
    assert "localhost/tagpipe-test/no-such-base:0 is missing" in proc.stderr
    assert "make it with: make base-image" in proc.stderr
