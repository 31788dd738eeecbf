"""`make bench-gpu`: GPU inference and GPU JPEG decode, measured in one run.

Two ways to run it, and every figure names which (`runtime`, `decoder`):

- `--runtime torch --decoder nvjpeg` (what `bench/bench_gpu.sh` runs on the GPU
  machine lent for measurements, which has torch + torchvision with CUDA but no
  package index): the model's ONNX file converted to torch, FP32, FP16
  channels-last, and FP16 with CUDA graphs; JPEGs decoded by torchvision's nvJPEG.
- `--runtime onnxruntime --decoder dali` (a machine with onnxruntime-gpu and DALI,
  the production GPU image): the CUDA provider (and TensorRT when present),
  FP32 and FP16.

Steps, each written to the JSON files as soon as it is done (`complete: false`
until the last), so a run cut short still leaves what it measured:

1. inference: raw runtime images/s for each variant, batch 1 to 256; then the
   real InferenceWorker (real nats-server and redis-server) at the best raw
   batch. Goal: service >= 0.90 x raw at that batch.
2. agreement: top-1 of each variant against onnxruntime on the CPU, on the
   downloader's crops of real photos (scikit-image's).
3. decode: the same photos (and 4x larger as camera JPEGs, forwarded as the
   downloader forwards them): one CPU core's decode + resize + crop against the
   GPU decoder, alone and followed by inference. Goal: GPU decode + inference
   >= 10 x one core's decode; top-1 of the GPU-decoded crops against the CPU
   path's (Pillow) >= 99.5 %.

Writes bench/results/inference-gpu.json and bench/results/decode-gpu.json, each
naming the device and the runtime; `tagpipe plan` reads `service_images_per_s`,
`gpu_decode_and_inference_images_per_s`, `device` and `dry_run`. `--dry-run` runs
every step on the CPU in seconds (the torch runtime on the CPU, the nvJPEG
decoder with Pillow standing in for nvJPEG itself, small batches), installs
nothing and writes into a temporary directory, device "cpu (dry run)": the check
that the script works before GPU time is spent on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tagpipe_cli.servers import nats_server, redis_server
from tagpipe_downloader.decode import Geometry, decode_image
from tagpipe_downloader.forward import decode_for_gpu
from tagpipe_inference.decoders import BatchDecoder, PillowDecoder, make_decoder
from tagpipe_inference.model import Model, load_manifest, load_model
from tagpipe_inference.providers import CPU, CUDA, TENSORRT, GpuOptions
from tagpipe_inference.settings import InferenceSettings

from bench.bench_inference import drain, machine, prefill, raw_run

GPU_BATCHES = (1, 8, 32, 64, 128, 256)
DRY_BATCHES = (1, 8)
SERVICE_GOAL = 0.90
DECODE_GOAL = 10.0
AGREEMENT_GOAL = 0.995
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")
GEOM = Geometry(256, 224, "bicubic")


class Budget:
    """The run's time box: steps past it are recorded as skipped, not run."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def photo_jpegs() -> list[bytes]:
    """Real photos as camera JPEGs: each at its size, 4x larger, and mirrored."""
    import io

    from PIL import Image
    from skimage import data

    out = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        big = np.asarray(Image.fromarray(arr).resize((arr.shape[1] * 4, arr.shape[0] * 4)))
        for a in (arr, big, np.ascontiguousarray(arr[:, ::-1])):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=92)
            out.append(buf.getvalue())
    return out


@dataclass(frozen=True)
class Variant:
    name: str
    providers: list[str]
    fp16: bool = False
    cuda_graphs: bool = False


def variants(args: argparse.Namespace, trt: bool) -> list[Variant]:
    if args.runtime == "torch":
        if args.dry_run:
            return [Variant("torch-cpu-fp32", [CPU])]
        gpu = [CUDA, CPU]
        return [
            Variant("torch-cuda-fp32", gpu),
            Variant("torch-cuda-fp16", gpu, fp16=True),
            Variant("torch-cuda-fp16-graphs", gpu, fp16=True, cuda_graphs=True),
        ]
    if args.dry_run:
        return [Variant("cpu-fp32", [CPU])]
    out = [Variant("cuda-fp32", [CUDA, CPU]), Variant("cuda-fp16", [CUDA, CPU], fp16=True)]
    if trt:
        out += [Variant("tensorrt-fp32", [TENSORRT, CUDA, CPU])]
        out += [Variant("tensorrt-fp16", [TENSORRT, CUDA, CPU], fp16=True)]
    return out


def load(args: argparse.Namespace, v: Variant, cache: Path, batch: int) -> Model:
    # On the GPU a variant that cannot reach it fails the run: a CPU figure must
    # never be written under a GPU's name.
    gpu = GpuOptions(
        fp16=v.fp16,
        trt_engine_cache=cache,
        max_batch=batch,
        cuda_graphs=v.cuda_graphs,
        require_gpu=not args.dry_run,
    )
    m = load_model(args.model_dir, v.providers, gpu=gpu, runtime=args.runtime)
    m.warm_up(batch)
    return m


class Report:
    """The two result files, rewritten after every step (`complete` at the end)."""

    def __init__(self, args: argparse.Namespace, out_dir: Path) -> None:
        info = machine()
        self.out_dir = out_dir
        self.common: dict[str, Any] = {
            "device": "cpu (dry run)" if args.dry_run else (info.get("gpu") or "no GPU found"),
            "runtime": args.runtime,
            "dry_run": args.dry_run,
            "machine": info | versions(),
            "command": "bench/bench_gpu.sh " + " ".join(args.argv),
        }
        self.docs: dict[str, dict[str, Any]] = {
            "inference-gpu": {"benchmark": "inference-gpu"},
            "decode-gpu": {"benchmark": "decode-gpu", "decoder": args.decoder},
        }
        out_dir.mkdir(parents=True, exist_ok=True)

    def update(self, name: str, complete: bool = False, **fields: Any) -> None:
        self.docs[name] |= fields
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        doc = self.docs[name] | self.common | {"measured_at": stamp, "complete": complete}
        path = self.out_dir / f"{name}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        if complete:
            print(f"wrote {path}: {json.dumps(doc.get('goal'))}")


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mod in ("torch", "torchvision", "onnx", "numpy", "PIL"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def inference_part(
    args: argparse.Namespace, budget: Budget, cache: Path, report: Report
) -> Variant:
    import onnxruntime as ort

    batches = DRY_BATCHES if args.dry_run else GPU_BATCHES
    all_variants = variants(args, TENSORRT in ort.get_available_providers())
    table: dict[str, Any] = {}
    for v in all_variants:
        if budget.left() < args.reserve_s:
            table[v.name] = {"skipped": "time budget"}
            continue
        m = load(args, v, cache, max(batches))
        by_batch = {str(b): round(raw_run(m, b, args.raw_s)[0], 1) for b in batches}
        table[v.name] = {"providers": m.providers, "raw_images_per_s_by_batch": by_batch}
        report.update("inference-gpu", model=f"{m.name} {m.version}", variants=table)
    measured = {k: v for k, v in table.items() if "raw_images_per_s_by_batch" in v}
    best_name = max(measured, key=lambda k: max(measured[k]["raw_images_per_s_by_batch"].values()))
    best = measured[best_name]["raw_images_per_s_by_batch"]
    best_batch = int(max(best, key=lambda k: best[k]))
    variant = next(v for v in all_variants if v.name == best_name)
    model = load(args, variant, cache, best_batch)
    service = service_run(model, best_batch, args.items_per_batch * best_batch, args.raw_s)
    ratio = service["images_per_s"] / service["raw_images_per_s"]
    report.update(
        "inference-gpu",
        best={"variant": best_name, "batch": best_batch, "providers": model.providers},
        raw_runtime_images_per_s=round(service["raw_images_per_s"], 1),
        service_images_per_s=round(service["images_per_s"], 1),
        ratio=round(ratio, 3),
        goal={"service_over_raw": SERVICE_GOAL, "met": ratio >= SERVICE_GOAL},
    )
    return variant


def service_run(model: Model, batch: int, items: int, raw_s: float) -> dict[str, Any]:
    """The real worker draining a pre-filled stream, next to the raw runtime."""
    import asyncio

    with tempfile.TemporaryDirectory(prefix="tagpipe-bench-gpu-") as tmp:
        nats = nats_server(Path(tmp) / "nats").start()
        redis = redis_server(Path(tmp) / "redis", persist=False).start()
        try:
            s = InferenceSettings(
                nats_url=nats.url, redis_url=redis.url, max_batch=batch, health_port=0
            )
            asyncio.run(prefill(s, items, "gpu"))
            raw = raw_run(model, batch, raw_s)[0]
            out = asyncio.run(drain(s, model, items, "gpu"))
        finally:
            nats.stop()
            redis.stop()
    return {**out, "raw_images_per_s": raw}


def reference_crops() -> np.ndarray:
    """The downloader's (CPU path's) crops of the photos."""
    return np.stack([decode_image(j, GEOM, 50_000_000).pixels for j in photo_jpegs()])


def agreement_part(args: argparse.Namespace, budget: Budget, cache: Path, report: Report) -> None:
    """Top-1 of each variant against onnxruntime on the CPU, on real photos' crops."""
    crops = reference_crops()
    reference = load_model(args.model_dir).predict(crops).argmax(1)
    out: dict[str, float | None] = {}
    for v in variants(args, trt=False):
        if budget.left() < args.reserve_s / 2:
            out[v.name] = None
            continue
        top = load(args, v, cache, len(crops)).predict(crops).argmax(1)
        out[v.name] = round(float(np.mean(top == reference)), 4)
    report.update(
        "inference-gpu",
        photos=len(crops),
        top1_agreement_with_cpu_onnxruntime=out,
        fp16_top1_agreement=fp16_agreement(args, cache, crops),
    )


def fp16_agreement(args: argparse.Namespace, cache: Path, crops: np.ndarray) -> float | None:
    """onnxruntime only: top-1 of the model directory's fp16 variant against FP32 on
    the CUDA provider (None without a variant, or with the torch runtime, whose FP16
    is in top1_agreement_with_cpu_onnxruntime)."""
    if args.dry_run or args.runtime != "onnxruntime":
        return None
    if "fp16" not in load_manifest(args.model_dir).variants:
        return None
    a = load(args, Variant("fp32", [CUDA, CPU]), cache, len(crops)).predict(crops).argmax(1)
    b = load(args, Variant("fp16", [CUDA, CPU], True), cache, len(crops)).predict(crops).argmax(1)
    return round(float(np.mean(a == b)), 4)


def rate(fn: Callable[[], int], min_s: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_s or n == 0:
        n += fn()
    return n / elapsed


def gpu_decoder(args: argparse.Namespace, batch: int) -> BatchDecoder:
    if not args.dry_run:
        return make_decoder(
            "gpu",
            GEOM.resize,
            GEOM.crop,
            max_batch=batch,
            require_gpu=True,
            gpu_decoder=args.decoder,
        )
    if args.decoder == "nvjpeg":  # the torch side of the nvJPEG decoder, Pillow for nvJPEG
        from tagpipe_inference.nvjpeg import NvjpegDecoder, pillow_jpeg

        return NvjpegDecoder(GEOM.resize, GEOM.crop, device="cpu", jpeg=pillow_jpeg)
    return PillowDecoder(GEOM.resize, GEOM.crop)


def decode_part(
    args: argparse.Namespace, budget: Budget, cache: Path, best: Variant, report: Report
) -> None:
    jpegs = photo_jpegs()
    forwarded = [decode_for_gpu(j, GEOM, 50_000_000).original or b"" for j in jpegs]
    flags = [False] * len(forwarded)
    batch = 8 if args.dry_run else 128
    reps = -(-batch // len(forwarded))
    payloads, crops = (forwarded * reps)[:batch], (flags * reps)[:batch]
    # One core: the CPU path the downloader runs (draft decode, resize, crop) per photo.
    per_core = rate(lambda: len([decode_image(j, GEOM, 50_000_000) for j in jpegs]), args.raw_s)
    dec = gpu_decoder(args, batch)
    name = dec.name + (" (dry run: Pillow decodes, torch crops)" if args.dry_run else "")
    report.update("decode-gpu", decoder=name, photos=len(jpegs), batch=batch)
    decode_rate = rate(lambda: len(dec.decode(payloads, crops)), args.raw_s)
    report.update(
        "decode-gpu",
        cpu_decode_images_per_s_per_core=round(per_core, 1),
        gpu_decode_images_per_s=round(decode_rate, 1),
        gpu_decode_over_one_core=round(decode_rate / per_core, 2),
    )
    model = load(args, best, cache, batch)

    def decode_and_infer() -> int:
        return len(model.predict(dec.decode(payloads, crops)))

    combined = rate(decode_and_infer, args.raw_s)
    top_cpu = model.predict(reference_crops()).argmax(1)
    top_gpu = model.predict(dec.decode(forwarded, flags)).argmax(1)
    agreement = float(np.mean(top_cpu == top_gpu))
    report.update(
        "decode-gpu",
        complete=True,
        inference_variant=best.name,
        gpu_decode_and_inference_images_per_s=round(combined, 1),
        speedup_over_one_core=round(combined / per_core, 2),
        top1_agreement_with_cpu_path=round(agreement, 4),
        goal={
            "speedup_over_one_core": DECODE_GOAL,
            "top1_agreement": AGREEMENT_GOAL,
            "met": combined / per_core >= DECODE_GOAL and agreement >= AGREEMENT_GOAL,
        },
        time_left_s=round(budget.left(), 1),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU only, seconds, nothing installed")
    ap.add_argument("--runtime", choices=("onnxruntime", "torch"), default="torch")
    ap.add_argument("--decoder", choices=("dali", "nvjpeg"), default="nvjpeg")
    ap.add_argument("--model-dir", type=Path, default=Path("models/efficientnet-lite0"))
    ap.add_argument("--out-dir", type=Path, help="default bench/results (a temp dir if dry)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting steps after")
    ap.add_argument("--reserve-s", type=float, default=60.0, help="kept for the later steps")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    args.raw_s = 0.3 if args.dry_run else 2.0
    args.items_per_batch = 3 if args.dry_run else 30
    budget = Budget(args.budget_s)
    out_dir = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="bench-gpu-dry-")) if args.dry_run else Path("bench/results")
    )
    report = Report(args, out_dir)
    with tempfile.TemporaryDirectory(prefix="trt-cache-") as cache:
        best = inference_part(args, budget, Path(cache), report)
        agreement_part(args, budget, Path(cache), report)
        report.update("inference-gpu", complete=True, time_left_s=round(budget.left(), 1))
        decode_part(args, budget, Path(cache), best, report)


if __name__ == "__main__":
    main()
