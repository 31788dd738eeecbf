"""The model repository: load a model directory, check it, run batches.

KServe-style split: this module knows models (load, ready, predict), never NATS or
Redis. Any model directory that satisfies `tagpipe_common.manifest` can be served,
so swapping models is configuration. A directory that does not keep its promises
(wrong checksum, missing labels, label count or output size not matching) stops
start-up with `ModelLoadError` and one clear message, never a half-working worker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pydantic import ValidationError
from tagpipe_common.manifest import MANIFEST_FILE, ModelManifest, sha256_file
from tagpipe_common.messages import Tag

from tagpipe_inference.providers import (
    GPU_PROVIDERS,
    TENSORRT,
    GpuOptions,
    gpu_outcome,
    plan_providers,
    trt_profile,
)

log = logging.getLogger(__name__)

U8Batch = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


Runtime = Literal["onnxruntime", "torch"]


class ModelLoadError(RuntimeError):
    """The model directory is missing, corrupt or inconsistent."""


class Session(Protocol):
    """What `Model` uses of a runtime: onnxruntime's session surface, which the torch
    runtime (`torch_runtime.TorchSession`) also offers."""

    def run(self, output_names: list[str], input_feed: dict[str, Any]) -> Sequence[Any]: ...
    def get_inputs(self) -> Sequence[Any]: ...
    def get_outputs(self) -> Sequence[Any]: ...
    def get_providers(self) -> list[str]: ...


def read_labels(path: Path, num_classes: int) -> list[str]:
    if not path.is_file():
        raise ModelLoadError(f"labels file {path} is missing")
    labels = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(labels) != num_classes:
        raise ModelLoadError(
            f"labels file {path} has {len(labels)} labels, the manifest says {num_classes} classes"
        )
    return labels


def load_manifest(model_dir: Path) -> ModelManifest:
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: not a model directory (run `make model`?)")
    try:
        return ModelManifest.load(model_dir)
    except (ValidationError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a valid model manifest: {exc}") from exc


def verify_file(model_dir: Path, manifest: ModelManifest, variant: str | None = None) -> Path:
    file, sha256 = manifest.file, manifest.sha256
    if variant is not None:
        file, sha256 = manifest.variants[variant].file, manifest.variants[variant].sha256
    path = model_dir / file
    if not path.is_file():
        raise ModelLoadError(f"model file {path} is missing")
    digest = sha256_file(path)
    if digest != sha256:
        raise ModelLoadError(
            f"model file {path} has sha256 {digest}, the manifest says {sha256}: "
            "corrupt or replaced file"
        )
    return path


def session_options(
    intra_op: int,
    inter_op: int,
    allow_spinning: bool,
    mem_pattern: bool = False,
    mem_arena: bool = True,
) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = mem_arena
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A memory pattern is one contiguous block planned per input shape. Under dynamic
    # batches every new size asks the CPU arena for another such block, and the arena
    # kept growing: +500 MiB in minutes in bench/results/memray-inference.txt. Without
    # it, tensors come from the arena's bins, reused across batch sizes.
    opts.enable_mem_pattern = mem_pattern
    opts.intra_op_num_threads = intra_op
    opts.inter_op_num_threads = inter_op
    spin = "1" if allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return opts


def softmax(x: F32) -> F32:
    z: F32 = (x - x.max(axis=-1, keepdims=True)).astype(np.float32, copy=False)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


@dataclass
class Model:
    """A loaded, checked model. `predict` is thread-safe (onnxruntime sessions are)."""

    manifest: ModelManifest
    labels: list[str]
    session: Session
    providers: list[str]
    ready: bool = False
    _scale: F32 = field(init=False, repr=False)
    _bias: F32 = field(init=False, repr=False)

    def __post_init__(self) -> None:
        pre = self.manifest.preprocess
        mean = np.asarray(pre.mean, dtype=np.float32)
        std = np.asarray(pre.std, dtype=np.float32)
        # (x/255 - mean)/std folded into one multiply-add per pixel.
        shape = (1, 3, 1, 1) if self.manifest.input.layout == "NCHW" else (1, 1, 1, 3)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(shape)
        self._bias = (mean / std).astype(np.float32).reshape(shape)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def input_hw(self) -> tuple[int, int]:
        c = self.manifest.preprocess.crop
        return c, c

    def preprocess(self, batch: U8Batch) -> F32:
        """uint8 NHWC RGB crops -> normalised float32 in the model's layout."""
        if batch.ndim != 4 or batch.shape[1:] != (*self.input_hw, 3):
            raise ValueError(f"batch shape {batch.shape}, expected (N, {self.input_hw}, 3)")
        if self.manifest.input.layout == "NCHW":
            # Transpose while still uint8 (4x fewer bytes), then convert and scale in one pass.
            batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        x: F32 = np.multiply(batch, self._scale, dtype=np.float32)
        x -= self._bias
        return x

    def run(self, x: F32) -> F32:
        """Scores (probabilities) for a preprocessed batch: shape (N, num_classes)."""
        (out,) = self.session.run([self.manifest.output.name], {self.manifest.input.name: x})
        y = np.asarray(out, dtype=np.float32)
        if y.shape != (x.shape[0], self.manifest.num_classes):
            raise RuntimeError(f"model returned shape {y.shape} for a batch of {x.shape[0]}")
        return softmax(y) if self.manifest.output_kind == "logits" else y

    def run_at_most(self, x: F32, max_batch: int) -> F32:
        """`run` in slices of at most `max_batch` rows. A pull can hand the worker more
        messages than it asked for (batches of up to 44 with max_batch 32 in a soak),
        and each batch size past the warm-up's grew onnxruntime's CPU arena for good
        (steps of 50-350 MiB; bench/results/memray-inference.txt). On a GPU it would
        also fall outside the TensorRT profile (1..max_batch)."""
        if len(x) <= max_batch:
            return self.run(x)
        parts = [self.run(x[i : i + max_batch]) for i in range(0, len(x), max_batch)]
        return np.concatenate(parts)

    def predict(self, batch: U8Batch) -> F32:
        return self.run(self.preprocess(batch))

    def top_k(self, scores: F32, k: int, min_score: float = 0.0) -> list[Tag]:
        """The k best classes of one row of scores, at least `min_score`, best first."""
        k = max(1, min(k, scores.shape[-1]))
        idx = np.argpartition(-scores, k - 1)[:k]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        return [
            Tag(label=self.labels[i], score=round(float(scores[i]), 6), class_id=int(i))
            for i in idx
            if scores[i] >= min_score
        ]

    @property
    def on_host_threads(self) -> bool:
        """Whether runs do their work on this process's threads (onnxruntime on the
        CPU), where an OS priority applies to them."""
        return isinstance(self.session, ort.InferenceSession) and self.providers == [
            "CPUExecutionProvider"
        ]

    def warm_up(self, batch_size: int = 1) -> None:
        """Run one batch so the first real request does not pay for lazy init; then ready."""
        h, w = self.input_hw
        self.predict(np.zeros((batch_size, h, w, 3), dtype=np.uint8))
        self.ready = True


def check_io(session: Session, manifest: ModelManifest) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if manifest.input.name not in inputs:
        raise ModelLoadError(f"model has no input {manifest.input.name!r} (has {list(inputs)})")
    if manifest.output.name not in outputs:
        raise ModelLoadError(f"model has no output {manifest.output.name!r} (has {list(outputs)})")
    crop = manifest.preprocess.crop
    want = [3, crop, crop] if manifest.input.layout == "NCHW" else [crop, crop, 3]
    in_shape = list(inputs[manifest.input.name].shape)
    fixed = [(d, e) for d, e in zip(in_shape[1:], want, strict=False) if isinstance(d, int)]
    if len(in_shape) != 4 or any(d != e for d, e in fixed):
        raise ModelLoadError(f"model input shape {in_shape} does not take {want} crops")
    out_shape = list(outputs[manifest.output.name].shape)
    if len(out_shape) != 2 or out_shape[1] != manifest.num_classes:
        raise ModelLoadError(
            f"model output shape {out_shape} does not match {manifest.num_classes} classes"
        )


def pick_variant(manifest: ModelManifest, providers: list[str], fp16: bool) -> str | None:
    """The fp16 file for the CUDA provider only: TensorRT makes its own FP16 engine
    from the FP32 file (trt_fp16_enable), and the CPU provider runs FP16 slower."""
    if not fp16 or "fp16" not in manifest.variants:
        return None
    gpu = [p for p in providers if p in GPU_PROVIDERS]
    return "fp16" if gpu and gpu[0] != TENSORRT else None


def _open(path: Path, opts: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc


def _preload_cuda(providers: list[str]) -> None:
    # onnxruntime-gpu finds the nvidia CUDA/cuDNN wheels' libraries only once told to.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None and any(p in GPU_PROVIDERS for p in providers):
        try:
            preload()
        except Exception as exc:  # a missing wheel: gpu_outcome reports it
            log.debug("preload_dlls failed: %s", exc)


def _load_torch(
    model_dir: Path,
    manifest: ModelManifest,
    labels: list[str],
    requested: list[str],
    gpu: GpuOptions,
    threads: int,
) -> Model:
    # torch is imported only where asked for: CPU images do not carry it.
    from tagpipe_inference.torch_runtime import TorchRuntimeError, open_torch

    try:
        session = open_torch(verify_file(model_dir, manifest), requested, gpu, threads)
    except TorchRuntimeError as exc:
        raise ModelLoadError(str(exc)) from exc
    check_io(session, manifest)
    used = session.get_providers()
    fields: dict[str, Any] = {"event": "model_loaded", "model": manifest.name, "runtime": "torch"}
    fields |= {"version": manifest.version, "variant": session.precision, "providers": used}
    log.info("model loaded", extra={"fields": fields})
    return Model(manifest=manifest, labels=labels, session=session, providers=used)


def load_model(
    model_dir: Path,
    providers: list[str] | None = None,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    allow_spinning: bool = False,
    gpu: GpuOptions | None = None,
    mem_pattern: bool = False,
    runtime: Runtime = "onnxruntime",
    mem_arena: bool = True,
) -> Model:
    """Load and check a model directory; raises ModelLoadError with the reason, or
    GpuUnavailable when `gpu.require_gpu` and no GPU provider came up."""
    gpu = gpu or GpuOptions()
    requested = providers or ["CPUExecutionProvider"]
    manifest = load_manifest(model_dir)
    labels = read_labels(model_dir / manifest.labels_file, manifest.num_classes)
    if runtime == "torch":
        return _load_torch(model_dir, manifest, labels, requested, gpu, intra_op_threads)
    _preload_cuda(requested)
    profile = trt_profile(manifest.input.name, manifest.preprocess.crop, gpu.max_batch)
    plan = plan_providers(requested, ort.get_available_providers(), gpu, profile)
    variant = pick_variant(manifest, [n for n, _ in plan], gpu.fp16)
    opts = session_options(
        intra_op_threads, inter_op_threads, allow_spinning, mem_pattern, mem_arena
    )
    session = _open(verify_file(model_dir, manifest, variant), opts, list(plan))
    used = list(session.get_providers())
    warning = gpu_outcome(requested, used, gpu.require_gpu)
    if warning is not None:
        log.warning(warning, extra={"fields": {"event": "gpu_fallback", "providers": used}})
    if variant is not None and not any(p in GPU_PROVIDERS for p in used):
        variant = None  # the GPU fell away: serve the FP32 file the CPU runs best
        session = _open(verify_file(model_dir, manifest), opts, [p for p in plan if p[0] in used])
    check_io(session, manifest)
    fields: dict[str, Any] = {
        "event": "model_loaded",
        "model": manifest.name,
        "version": manifest.version,
        "variant": variant or "fp32",
        "providers_requested": providers,
        "providers": used,
        "intra_op_threads": intra_op_threads,
        "inter_op_threads": inter_op_threads,
        "allow_spinning": allow_spinning,
        "mem_pattern": mem_pattern,
    }
    log.info("model loaded", extra={"fields": fields})
    return Model(manifest=manifest, labels=labels, session=session, providers=used)
