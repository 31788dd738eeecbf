"""The torch runtime (`runtime: torch`): the model directory's ONNX file, run by torch
behind onnxruntime's session surface (`run`, `get_inputs`, `get_outputs`,
`get_providers`), so `Model`, the worker and the benches run it unchanged.

Why a second runtime: the GPU machine lent for measurements has torch with CUDA but
no onnxruntime-gpu (its wheel alone is ~250 MB, over what one run may carry), so
this is how the GPU figures get measured there. onnxruntime-gpu stays the default
for GPU images; every figure names the runtime that produced it.

- The graph is converted by `onnx_torch` (constants folded, symmetric pads fused
  into their convolutions); the FP32 file is the source for both precisions.
- On CUDA, FP16 runs the converted module in half precision, channels-last
  (NHWC, the layout cuDNN's tensor-core convolutions want); inputs and outputs
  stay float32 numpy, as onnxruntime's do.
- `cuda_graphs`: each batch size is captured once, on its first run, and replayed
  after, which takes the ~100 kernel launches per batch off the CPU.
"""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from tagpipe_inference.onnx_torch import load, shapes
from tagpipe_inference.providers import GPU_PROVIDERS, GpuOptions, GpuUnavailable

log = logging.getLogger(__name__)

TORCH_CPU = "TorchCPU"
TORCH_CUDA = "TorchCUDA"


class TorchRuntimeError(RuntimeError):
    """The model cannot be converted or placed on the asked device."""


@dataclass(frozen=True)
class NodeArg:
    """What onnxruntime's NodeArg offers that this project reads."""

    name: str
    shape: list[int | str]
    type: str = "tensor(float)"


@dataclass(frozen=True)
class TorchOptions:
    device: str = "cpu"  # "cpu" or "cuda:N"
    fp16: bool = False
    cuda_graphs: bool = False
    threads: int = 0  # CPU only; 0: torch's default


class _Graphs:
    """One captured CUDA graph per batch size, with its static input and output."""

    def __init__(self, module: torch.nn.Module, example: torch.Tensor, pool: Any) -> None:
        self.static_in = example.clone()
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # the documented warm-up before a capture
            for _ in range(2):
                module(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_out: torch.Tensor = module(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


class TorchSession:
    """An ONNX classifier run by torch, answering as an onnxruntime session would."""

    def __init__(self, path: Path, options: TorchOptions | None = None) -> None:
        self.options = opts = options or TorchOptions()
        self.device = torch.device(opts.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TorchRuntimeError(f"{opts.device} asked for, but torch sees no CUDA device")
        if opts.threads and self.device.type == "cpu":
            torch.set_num_threads(opts.threads)
        try:
            module, graph = load(path)
        except Exception as exc:  # UnsupportedGraph, OSError, protobuf's DecodeError ...
            raise TorchRuntimeError(f"cannot convert {path} to torch: {exc}") from exc
        self.dtype = torch.float16 if opts.fp16 else torch.float32
        self.layout = torch.channels_last if opts.fp16 else torch.contiguous_format
        module = module.eval().to(self.device, self.dtype)
        # Module.to takes memory_format at run time; torch's stubs do not list it.
        self.module = module.to(memory_format=self.layout)  # type: ignore[call-overload]
        self._inputs = [
            NodeArg(n, s) for n, s in shapes(graph.graph.input) if n == module.input_name
        ]
        self._outputs = [NodeArg(n, s) for n, s in shapes(graph.graph.output)]
        self._graphs: dict[tuple[int, ...], _Graphs] = {}
        self._pool: Any = None
        if self.device.type == "cuda":
            # Shapes repeat (one per batch size): let cuDNN time its kernels once per shape.
            torch.backends.cudnn.benchmark = True
        # One batch at a time: captured graphs share their static buffers, and one
        # device runs one batch at a time anyway; the next batch is prepared meanwhile.
        self._lock = threading.Lock()

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [TORCH_CUDA if self.device.type == "cuda" else TORCH_CPU]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.options.cuda_graphs and self.device.type == "cuda"):
            out: torch.Tensor = self.module(x)
            return out
        key = tuple(x.shape)
        if key not in self._graphs:
            # One memory pool for every batch size's graph: they never run at once (the
            # lock), so their scratch memory can be shared instead of growing per size.
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            self._graphs[key] = _Graphs(self.module, x, self._pool)
        return self._graphs[key](x)

    def run(
        self, output_names: list[str] | None, feeds: dict[str, npt.NDArray[Any]]
    ) -> list[npt.NDArray[np.float32]]:
        """onnxruntime's `run`: float32 numpy in, float32 numpy out."""
        (name,) = (i.name for i in self._inputs)
        wanted = output_names or [o.name for o in self._outputs]
        if wanted != [o.name for o in self._outputs]:
            raise TorchRuntimeError(f"outputs {wanted} asked, the model has {self._outputs}")
        host = torch.from_numpy(np.ascontiguousarray(feeds[name]))
        # The device is per thread in CUDA, and the worker runs batches on pool threads.
        on = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        with self._lock, on, torch.inference_mode():
            x = host.to(self.device, non_blocking=True).to(self.dtype, memory_format=self.layout)
            y = self._forward(x).float().cpu()
        return [y.numpy()]

    @property
    def precision(self) -> str:
        return "fp16" if self.options.fp16 else "fp32"


def open_torch(path: Path, providers: list[str], gpu: GpuOptions, threads: int = 0) -> TorchSession:
    """The torch session the inference settings ask for: on CUDA when a GPU provider
    is asked for and torch sees a device, else on the CPU with one warning line (or
    GpuUnavailable when the GPU is required). FP16 on CUDA only, as with onnxruntime,
    where the CPU runs FP16 slower than FP32."""
    wants_gpu = any(p in GPU_PROVIDERS for p in providers)
    on_gpu = wants_gpu and torch.cuda.is_available()
    if wants_gpu and not on_gpu:
        why = f"torch {torch.__version__} sees no CUDA device"
        if gpu.require_gpu:
            raise GpuUnavailable(f"torch runtime required on the GPU but unavailable: {why}")
        log.warning(
            "torch runtime: %s; running on CPU", why, extra={"fields": {"event": "gpu_fallback"}}
        )
    opts = TorchOptions(
        device=f"cuda:{gpu.device_id}" if on_gpu else "cpu",
        fp16=gpu.fp16 and on_gpu,
        cuda_graphs=gpu.cuda_graphs and on_gpu,
        threads=threads,
    )
    return TorchSession(path, opts)
