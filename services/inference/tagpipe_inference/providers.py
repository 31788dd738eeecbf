"""Execution providers: which ones to ask onnxruntime for, with what options, and
what to do when the GPU is not there.

The settings name providers by preference (TensorRT, CUDA, CPU). Two things can
take the GPU away, and onnxruntime reports neither as an error:

- the build has no GPU provider (the CPU wheel): `get_available_providers()` lacks it;
- the build has it but a CUDA library is missing or the driver is too old: the
  session quietly comes up on CPU, and only `session.get_providers()` tells.

Both end in `gpu_outcome`: one warning line naming what is missing and the CPU
fallback, or, when the deployment demands the GPU (`require_gpu`, set by the
operator for GPU replicas), `GpuUnavailable`, which stops start-up (exit 2). A GPU
replica silently serving at CPU speed would hold a T4 node and a tenth of its rate.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)

# What onnxruntime-gpu's CUDA provider dlopens. 1.27 and later are CUDA 13 builds:
# the runtime and cuBLAS are .so.13, cuFFT 12 and cuRAND 10 are the majors that
# ship with CUDA 13, cuDNN is 9 (nvidia-cuda-runtime 13, nvidia-cufft, nvidia-curand,
# nvidia-cudnn-cu13 and, through it, nvidia-cublas; or a CUDA 13 cuDNN base image).
# Probing by name gives the warning line its reason, which onnxruntime itself only
# prints among its own native log lines.
CUDA_LIBS = (
    "libcuda.so.1",
    "libcudart.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcufft.so.12",
    "libcurand.so.10",
    "libcudnn.so.9",
)

ProviderEntry = tuple[str, dict[str, str]]


class GpuUnavailable(RuntimeError):
    """The deployment demands a GPU provider and none came up."""


@dataclass(frozen=True)
class GpuOptions:
    """The GPU side of the inference settings (CRD `spec.inference`)."""

    device_id: int = 0
    fp16: bool = False
    # TensorRT builds an engine per model and shape profile (minutes on a T4);
    # a cache directory on a volume makes every restart after the first cheap.
    trt_engine_cache: Path | None = None
    require_gpu: bool = False
    max_batch: int = 32
    # The torch runtime only: capture a CUDA graph per batch size on its first run.
    cuda_graphs: bool = False


def choose_providers(preferred: list[str], available: list[str]) -> list[str]:
    """Preferred providers this onnxruntime build has, in preference order; CPU always last."""
    chosen = [p for p in preferred if p in available and p != CPU]
    return [*chosen, CPU]


def trt_profile(input_name: str, crop: int, max_batch: int) -> dict[str, str]:
    # Without a shape profile TensorRT builds a new engine for every batch size
    # it meets; one profile from 1 to max_batch covers the dynamic batcher.
    def shape(n: int) -> str:
        return f"{input_name}:{n}x3x{crop}x{crop}"

    return {
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(max_batch),
        "trt_profile_max_shapes": shape(max_batch),
    }


def provider_options(
    name: str, gpu: GpuOptions, profile: dict[str, str] | None = None
) -> dict[str, str]:
    """onnxruntime's option strings for one provider."""
    if name == CUDA:
        return {"device_id": str(gpu.device_id)}
    if name != TENSORRT:
        return {}
    opts = {"device_id": str(gpu.device_id), "trt_fp16_enable": str(gpu.fp16).lower()}
    if gpu.trt_engine_cache is not None:
        cache = str(gpu.trt_engine_cache)
        opts |= {
            "trt_engine_cache_enable": "true",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "true",
            "trt_timing_cache_path": cache,
        }
    return opts | (profile or {})


def plan_providers(
    preferred: list[str],
    available: list[str],
    gpu: GpuOptions,
    profile: dict[str, str] | None = None,
) -> list[ProviderEntry]:
    """(name, options) pairs to pass to `InferenceSession(providers=...)`."""
    names = choose_providers(preferred, available)
    return [(n, provider_options(n, gpu, profile)) for n in names]


def missing_cuda_lib(load: Callable[[str], object] = ctypes.CDLL) -> str | None:
    """The first CUDA library the dynamic loader cannot find, or None."""
    for lib in CUDA_LIBS:
        try:
            load(lib)
        except OSError:
            return lib
    return None


def gpu_outcome(
    requested: list[str],
    used: list[str],
    require_gpu: bool,
    reason: Callable[[], str | None] = missing_cuda_lib,
) -> str | None:
    """None when every requested GPU provider is in use; else the one warning line.

    Raises GpuUnavailable when no GPU provider came up and the GPU is required.
    """
    wanted = [p for p in requested if p in GPU_PROVIDERS]
    missing = [p for p in wanted if p not in used]
    if not missing:
        return None
    got = [p for p in used if p in GPU_PROVIDERS]
    if got:  # TensorRT absent (not in the default image) but CUDA up: still a GPU replica
        return f"{', '.join(missing)} unavailable; running on {', '.join(got)}"
    lib = reason()
    why = f"{lib} not found" if lib else "onnxruntime could not start it (see its log above)"
    if require_gpu:
        raise GpuUnavailable(f"{', '.join(missing)} required but unavailable: {why}")
    return f"{', '.join(missing)} unavailable ({why}); running on CPU"
