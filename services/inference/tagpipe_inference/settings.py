"""Inference worker settings (environment variables prefixed TAGPIPE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from tagpipe_common.settings import CommonSettings

from tagpipe_inference.providers import GpuOptions

# Preference order; intersected at start-up with what this onnxruntime build offers.
DEFAULT_PROVIDERS = "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider"


class InferenceSettings(CommonSettings):
    model_dir: Path = Field(Path("models/efficientnet-lite0"), description="model directory")
    providers: str = Field(DEFAULT_PROVIDERS, description="execution providers, by preference")
    device_id: Annotated[int, Field(ge=0, le=63)] = 0  # which GPU (CUDA / TensorRT)
    # CUDA: serve the model directory's `fp16` variant; TensorRT: build an FP16 engine.
    fp16: bool = False
    trt_engine_cache_dir: Path | None = None  # None: TensorRT rebuilds engines at start
    # The operator sets it for GPU replicas: exit 2 rather than serve on the CPU.
    require_gpu: bool = False
    # onnxruntime: the default, CPU and GPU images alike (onnxruntime-gpu). torch: the
    # same ONNX file converted to torch (torch_runtime), for machines with torch+CUDA
    # but no onnxruntime-gpu; FP16 there is half precision, channels-last.
    runtime: Literal["onnxruntime", "torch"] = "onnxruntime"
    cuda_graphs: bool = False  # torch runtime on CUDA: one captured graph per batch size
    # gpu: `original` frames are decoded, resized and normalised on the GPU;
    # cpu: on this process's CPU. Raw-crop frames never need decoding either way.
    decode: Literal["cpu", "gpu"] = "cpu"
    # Which GPU decoder `decode: gpu` uses: DALI (nvidia-dali-cuda130), or nvJPEG
    # through torchvision.io.decode_jpeg (needs only torch + torchvision).
    gpu_decoder: Literal["dali", "nvjpeg"] = "dali"
    intra_op_threads: Annotated[int, Field(ge=0, le=256)] = 0  # 0: onnxruntime's default
    inter_op_threads: Annotated[int, Field(ge=0, le=256)] = 0
    # Spinning threads burn the CPU between batches, which starves the event loop
    # that fetches the next batch on small machines (see bench/results).
    allow_spinning: bool = False
    # onnxruntime's memory pattern: off, since with dynamic batch sizes it made the CPU
    # arena grow without bound (see model.session_options); on: onnxruntime's default.
    mem_pattern: bool = False
    max_batch: Annotated[int, Field(ge=1, le=1024)] = 32
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = 20.0
    # How long one fetch may wait just to look at a lane that may be empty. Too short,
    # and a starved process misses waiting real-time items (they join the next batch);
    # too long, and a fast GPU idles while an empty real-time lane is polled.
    lane_peek_ms: Annotated[float, Field(ge=0.5, le=1000)] = 10.0
    # A real-time batch also takes the bulk items waiting: free on a GPU, where a batch
    # of 8 costs about what one does; on a CPU every bulk item adds its own model time
    # to the real-time answers (~10 ms each here), so off by default. On, one loop and
    # one model serve both lanes in shared batches, and a real-time item waits for a
    # free batch slot like a bulk one; off, real-time has its own (collect.py).
    mix_lanes: bool = False
    # A batch that waited for a busy model takes what each lane holds when the model
    # frees, with one fetch of this wait per lane (also the least any "what is there by
    # now" fetch waits). The freed model idles for it, so it is short; a reply later
    # than it is not lost, it starts the next batch.
    top_up_ms: Annotated[float, Field(ge=0.5, le=1000)] = 2.0
    # Batches in flight: one running in onnxruntime, the next fetched and prepared.
    pipeline_depth: Annotated[int, Field(ge=1, le=8)] = 2
    health_port: Annotated[int, Field(ge=0, le=65535)] = 8080  # 0: no health listener
    health_host: str = "0.0.0.0"
    nak_delay_s: Annotated[float, Field(ge=0, le=3600)] = 2.0
    store_backoff_max_s: Annotated[float, Field(gt=0, le=60)] = 2.0  # Redis down: retry cap
    # Test hook only: exit right after storing results, before acking (crash tests).
    crash_before_ack: bool = False

    @field_validator("providers")
    @classmethod
    def _providers_listed(cls, v: str) -> str:
        if not [p for p in v.split(",") if p.strip()]:
            raise ValueError("name at least one execution provider")
        return v

    @property
    def provider_list(self) -> list[str]:
        return [p.strip() for p in self.providers.split(",") if p.strip()]

    @property
    def gpu_options(self) -> GpuOptions:
        return GpuOptions(
            device_id=self.device_id,
            fp16=self.fp16,
            trt_engine_cache=self.trt_engine_cache_dir,
            require_gpu=self.require_gpu,
            max_batch=self.max_batch,
            cuda_graphs=self.cuda_graphs,
        )
