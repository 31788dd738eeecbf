"""Execution-provider selection and the GPU fallback, on this CPU-only machine.

The CPU wheel of onnxruntime has no CUDA provider, which is exactly the
"GPU asked for, not there" case; the case of a GPU build whose CUDA libraries
are missing (the provider is listed, the session comes up on CPU) is the same
decision in `gpu_outcome`, tested with the providers a session would report.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tagpipe_common.manifest import ModelVariant
from tagpipe_inference.model import load_manifest, load_model, pick_variant
from tagpipe_inference.providers import (
    CPU,
    CUDA,
    CUDA_LIBS,
    TENSORRT,
    GpuOptions,
    GpuUnavailable,
    gpu_outcome,
    missing_cuda_lib,
    plan_providers,
    provider_options,
    trt_profile,
)
from tagpipe_inference.settings import InferenceSettings

ALL = [TENSORRT, CUDA, CPU]


def no_reason() -> str | None:
    return None


def test_options_carry_device_fp16_and_the_engine_cache(tmp_path: Path) -> None:
    gpu = GpuOptions(device_id=1, fp16=True, trt_engine_cache=tmp_path)
    assert provider_options(CUDA, gpu) == {"device_id": "1"}
    trt = provider_options(TENSORRT, gpu, trt_profile("input", 224, 64))
    assert trt["device_id"] == "1"
    assert trt["trt_fp16_enable"] == "true"
    assert trt["trt_engine_cache_enable"] == "true"
    assert trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_profile_max_shapes"] == "input:64x3x224x224"
    assert trt["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert "trt_engine_cache_enable" not in provider_options(TENSORRT, GpuOptions())
    assert provider_options(CPU, gpu) == {}


def test_the_plan_keeps_preference_order_with_options() -> None:
    plan = plan_providers(ALL, [CUDA, CPU], GpuOptions(device_id=2))
    assert plan == [(CUDA, {"device_id": "2"}), (CPU, {})]
    assert plan_providers(ALL, [CPU], GpuOptions()) == [(CPU, {})]


def test_all_gpu_providers_up_is_silent() -> None:
    assert gpu_outcome(ALL, [TENSORRT, CUDA, CPU], require_gpu=True) is None
    assert gpu_outcome([CPU], [CPU], require_gpu=False) is None


def test_tensorrt_missing_but_cuda_up_still_serves_on_the_gpu() -> None:
    line = gpu_outcome(ALL, [CUDA, CPU], require_gpu=True, reason=no_reason)
    assert line == "TensorrtExecutionProvider unavailable; running on CUDAExecutionProvider"


def test_a_missing_cuda_library_falls_back_to_cpu_with_its_name() -> None:
    # A GPU build whose session came up on CPU only: the probe names the library.
    line = gpu_outcome([CUDA, CPU], [CPU], False, reason=lambda: "libcudnn.so.9")
    assert line == "CUDAExecutionProvider unavailable (libcudnn.so.9 not found); running on CPU"


def test_a_required_gpu_that_is_missing_refuses() -> None:
    with pytest.raises(GpuUnavailable, match=r"required but unavailable: libcudart\.so\.13"):
        gpu_outcome([CUDA, CPU], [CPU], True, reason=lambda: "libcudart.so.13")


def test_the_library_probe_reports_the_first_that_fails() -> None:
    def load(name: str) -> object:
        if name in ("libcublasLt.so.13", "libcudnn.so.9"):
            raise OSError(name)
        return object()

    assert missing_cuda_lib(load) == "libcublasLt.so.13"
    assert missing_cuda_lib(lambda name: object()) is None


def test_the_probe_asks_for_one_cuda_major_only() -> None:
    # onnxruntime-gpu >= 1.27 is a CUDA 13 build: a .so.12 runtime or cuBLAS would be
    # the wrong major (cuFFT 12 is CUDA 13's own cuFFT).
    asked: list[str] = []
    missing_cuda_lib(asked.append)
    assert asked == list(CUDA_LIBS)
    assert {"libcudart.so.13", "libcublas.so.13", "libcudnn.so.9"} <= set(asked)
    assert not [n for n in asked if n.startswith(("libcudart", "libcublas")) and ".so.13" not in n]


def test_fp16_variant_only_for_the_cuda_provider(model_dir: Path) -> None:
    m = load_manifest(model_dir)
    v = ModelVariant(file="model.fp16.onnx", sha256="0" * 64)
    with_fp16 = m.model_copy(update={"variants": {"fp16": v}})
    assert pick_variant(with_fp16, [CUDA, CPU], fp16=True) == "fp16"
    assert pick_variant(with_fp16, [TENSORRT, CUDA, CPU], fp16=True) is None  # TRT makes its own
    assert pick_variant(with_fp16, [CPU], fp16=True) is None
    assert pick_variant(with_fp16, [CUDA, CPU], fp16=False) is None
    no_variant = m.model_copy(update={"variants": {}})
    assert pick_variant(no_variant, [CUDA, CPU], fp16=True) is None


def test_cuda_asked_of_a_cpu_build_warns_once_and_serves(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        model = load_model(model_dir, providers=ALL, intra_op_threads=1)
    assert model.providers == [CPU]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert (
        warnings[0]
        .getMessage()
        .startswith("TensorrtExecutionProvider, CUDAExecutionProvider unavailable (")
    )
    assert warnings[0].getMessage().endswith("; running on CPU")


def test_settings_carry_the_gpu_options(tmp_path: Path) -> None:
    s = InferenceSettings(
        device_id=3, fp16=True, trt_engine_cache_dir=tmp_path, require_gpu=True, max_batch=128
    )
    assert s.gpu_options == GpuOptions(3, True, tmp_path, True, 128)
    assert InferenceSettings().decode == "cpu"


def test_the_service_exits_2_with_one_line_when_the_gpu_is_required(model_dir: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "TAGPIPE_MODEL_DIR": str(model_dir),
        "TAGPIPE_PROVIDERS": "CUDAExecutionProvider,CPUExecutionProvider",
        "TAGPIPE_REQUIRE_GPU": "true",
        "TAGPIPE_METRICS_PORT": "0",
        "TAGPIPE_INTRA_OP_THREADS": "1",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tagpipe_inference"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("tagpipe-inference: no GPU: CUDAExecutionProvider required")
