"""The Dockerfile, linted without an engine (no hadolint or registry here).

`make images` builds the CPU variant on this machine; the GPU inference target cannot be
built here (its CUDA base is on a registry), so its arguments, stages and lock are checked
by reading the file: every FROM names an ARG or an earlier stage, every COPY --from an
earlier stage, every requirements file it installs exists, and the GPU stage is CUDA 13
throughout.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", TEXT)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def global_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for word, rest in instructions():
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def stages() -> dict[str, tuple[str, list[str]]]:
    """name -> (FROM reference, the stage's other instructions as text)."""
    out: dict[str, tuple[str, list[str]]] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            ref, _, name = rest.partition(" AS ")
            current = name.strip()
            out[current] = (ref.strip(), [])
        elif current is not None:
            out[current][1].append(f"{word} {rest}")
    return out


def test_every_from_and_copy_from_resolves() -> None:
    args, seen = global_args(), set()
    for name, (ref, body) in stages().items():
        if m := re.fullmatch(r"\$\{(\w+)\}", ref):
            assert m.group(1) in args, f"{name}: FROM ${{{m.group(1)}}} is not a global ARG"
        else:
            assert ref in seen, f"{name}: FROM {ref} is no earlier stage"
        for line in body:
            if m := re.match(r"COPY --from=([\w-]+)", line):
                assert m.group(1) in seen, f"{name}: COPY --from={m.group(1)}"
        seen.add(name)


def test_base_images_stay_build_args() -> None:
    args = global_args()
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    assert {ref for ref, _ in stages().values() if not ref.startswith("$")} <= set(stages())


@pytest.mark.parametrize("component", ["operator", "gateway", "downloader", "inference"])
def test_each_component_target_installs_its_hashed_lock(component: str) -> None:
    all_stages = stages()
    assert component in all_stages
    venv = "inference-venv" if component == "inference" else f"{component}-venv"
    runs = " ".join(line for line in all_stages[venv][1] if line.startswith("RUN"))
    assert "--require-hashes --no-deps -r" in runs
    assert "pip install --no-deps ." in runs
    lock = global_args()["INFERENCE_LOCK"] if component == "inference" else component
    if component == "inference":
        assert '"requirements/${INFERENCE_LOCK}.txt"' in runs
        assert (ROOT / "requirements/inference.txt").exists()  # the CPU variant's
    else:
        assert (ROOT / f"requirements/{lock}.txt").exists()


def test_gpu_stage_is_cuda_13() -> None:
    args = global_args()
    base = args["INFERENCE_BASE_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    assert args["INFERENCE_LOCK"] == "inference-gpu"
    assert "tensorrt" not in TEXT.lower().replace("tensorrt is not in the image", "")


def test_gpu_lock_is_cuda_13_only() -> None:
    lock = ROOT / "requirements/inference-gpu.txt"
    if not lock.exists():
        pytest.skip("requirements/inference-gpu.txt: `make lock` after the CUDA 13 GPU extra")
    names = {line.split("==")[0] for line in lock.read_text().splitlines() if "==" in line}
    assert {"onnxruntime-gpu", "nvidia-dali-cuda130"} <= names
    assert not {n for n in names if n.endswith(("-cu12", "cuda120")) or "tensorrt" in n}


def test_model_stage_takes_torch_from_its_pin_not_the_lock() -> None:
    _, body = stages()["model"]
    run = " ".join(line for line in body if line.startswith("RUN"))
    words = shlex.split(run.replace("&&", " "))
    assert "requirements/torch.txt" in words and "requirements/model.txt" in words
    assert "--find-links" in words
