"""`make bench-gpu`: GPU inference and GPU JPEG decode, measured in one run.

On a GPU machine (`bench/bench_gpu.sh` first installs onnxruntime-gpu, the CUDA 12
wheels, DALI and, when it installs, TensorRT into their own venv):

1. inference: raw onnxruntime for every provider this build brings up (CUDA,
   TensorRT when present), FP32 and FP16, batch 1 to 256; then the real
   InferenceWorker (real nats-server and redis-server) at the best raw batch.
   Goal: service >= 0.90 x raw at that batch.
2. decode: real photos (scikit-image's, and 4x larger as camera JPEGs, forwarded
   as the downloader forwards them): one CPU core's decode + resize + crop
   against the GPU decoder, alone and followed by inference. Goal: GPU decode +
   inference >= 10 x one core's decode. Top-1 agreement of the GPU-decoded crops
   with the CPU path (goal >= 99.5 %), and of FP16 with FP32.

Writes bench/results/inference-gpu.json and bench/results/decode-gpu.json, each
naming the device; `tagpipe plan` reads them. `--dry-run` runs every step on
the CPU in seconds (CPU provider, the Pillow stand-in for the GPU decoder, small
batches), installs nothing and writes into a temporary directory, device
"cpu (dry run)": the check that the script works before GPU time is spent on it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
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


def variants(dry: bool, trt: bool) -> list[tuple[str, list[str], bool]]:
    if dry:
        return [("cpu-fp32", [CPU], False)]
    out = [("cuda-fp32", [CUDA, CPU], False), ("cuda-fp16", [CUDA, CPU], True)]
    if trt:
        out += [("tensorrt-fp32", [TENSORRT, CUDA, CPU], False)]
        out += [("tensorrt-fp16", [TENSORRT, CUDA, CPU], True)]
    return out


def load(model_dir: Path, providers: list[str], fp16: bool, cache: Path, batch: int) -> Model:
    gpu = GpuOptions(fp16=fp16, trt_engine_cache=cache, max_batch=batch)
    m = load_model(model_dir, providers, gpu=gpu)
    m.warm_up(batch)
    return m


def inference_part(args: argparse.Namespace, budget: Budget, cache: Path) -> dict[str, Any]:
    import onnxruntime as ort

    batches = DRY_BATCHES if args.dry_run else GPU_BATCHES
    trt = TENSORRT in ort.get_available_providers()
    table: dict[str, Any] = {}
    for name, providers, fp16 in variants(args.dry_run, trt):
        if budget.left() < args.reserve_s:
            table[name] = {"skipped": "time budget"}
            continue
        m = load(args.model_dir, providers, fp16, cache, max(batches))
        by_batch = {str(b): round(raw_run(m, b, args.raw_s)[0], 1) for b in batches}
        table[name] = {"providers": m.providers, "raw_images_per_s_by_batch": by_batch}
    measured = {k: v for k, v in table.items() if "raw_images_per_s_by_batch" in v}
    best_name = max(measured, key=lambda k: max(measured[k]["raw_images_per_s_by_batch"].values()))
    best = measured[best_name]["raw_images_per_s_by_batch"]
    best_batch = int(max(best, key=lambda k: best[k]))
    _, providers, fp16 = next(v for v in variants(args.dry_run, trt) if v[0] == best_name)
    model = load(args.model_dir, providers, fp16, cache, best_batch)
    service = service_run(model, best_batch, args.items_per_batch * best_batch, args.raw_s)
    ratio = service["images_per_s"] / service["raw_images_per_s"]
    return {
        "benchmark": "inference-gpu",
        "model": f"{model.name} {model.version}",
        "variants": table,
        "best": {"variant": best_name, "batch": best_batch, "providers": model.providers},
        "raw_ort_images_per_s": round(service["raw_images_per_s"], 1),
        "service_images_per_s": round(service["images_per_s"], 1),
        "ratio": round(ratio, 3),
        "goal": {"service_over_raw": SERVICE_GOAL, "met": ratio >= SERVICE_GOAL},
        "fp16_top1_agreement": None if args.dry_run else fp16_agreement(args, cache),
    }


def service_run(model: Model, batch: int, items: int, raw_s: float) -> dict[str, Any]:
    """The real worker draining a pre-filled stream, next to raw onnxruntime."""
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


def fp16_agreement(args: argparse.Namespace, cache: Path) -> float | None:
    """Top-1 of the model directory's fp16 variant against FP32 on the CUDA provider
    (None without a variant: `make model` builds it)."""
    if "fp16" not in load_manifest(args.model_dir).variants:
        return None
    geom = Geometry(256, 224, "bicubic")
    crops = np.stack([decode_image(j, geom, 50_000_000).pixels for j in photo_jpegs()])
    a = load(args.model_dir, [CUDA, CPU], False, cache, len(crops)).predict(crops).argmax(1)
    b = load(args.model_dir, [CUDA, CPU], True, cache, len(crops)).predict(crops).argmax(1)
    return round(float(np.mean(a == b)), 4)


def rate(fn: Callable[[], int], min_s: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_s or n == 0:
        n += fn()
    return n / elapsed


def decode_part(args: argparse.Namespace, budget: Budget, cache: Path) -> dict[str, Any]:
    geom = Geometry(256, 224, "bicubic")
    jpegs = photo_jpegs()
    forwarded = [decode_for_gpu(j, geom, 50_000_000).original or b"" for j in jpegs]
    flags = [False] * len(forwarded)
    batch = 8 if args.dry_run else 128
    reps = -(-batch // len(forwarded))
    payloads, crops = (forwarded * reps)[:batch], (flags * reps)[:batch]
    cpu_dec = PillowDecoder(geom.resize, geom.crop)
    # One core: the CPU path the downloader runs (draft decode, resize, crop) per photo.
    per_core = rate(lambda: sum(1 for j in jpegs if decode_image(j, geom, 50_000_000)), args.raw_s)
    gpu_dec: BatchDecoder = (
        cpu_dec
        if args.dry_run
        else make_decoder("gpu", geom.resize, geom.crop, max_batch=batch, require_gpu=True)
    )
    decode_rate = rate(lambda: len(gpu_dec.decode(payloads, crops)), args.raw_s)
    model = load(args.model_dir, [CPU] if args.dry_run else [CUDA, CPU], False, cache, batch)

    def decode_and_infer() -> int:
        return len(model.predict(gpu_dec.decode(payloads, crops)))

    combined = rate(decode_and_infer, args.raw_s)
    reference = np.stack([decode_image(j, geom, 50_000_000).pixels for j in jpegs])
    top_cpu = model.predict(reference).argmax(1)
    top_gpu = model.predict(gpu_dec.decode(forwarded, flags)).argmax(1)
    agreement = float(np.mean(top_cpu == top_gpu))
    return {
        "benchmark": "decode-gpu",
        "decoder": gpu_dec.name if not args.dry_run else "cpu stand-in (Pillow)",
        "photos": len(jpegs),
        "batch": batch,
        "cpu_decode_images_per_s_per_core": round(per_core, 1),
        "gpu_decode_images_per_s": round(decode_rate, 1),
        "gpu_decode_and_inference_images_per_s": round(combined, 1),
        "speedup_over_one_core": round(combined / per_core, 2),
        "top1_agreement_with_cpu_path": round(agreement, 4),
        "goal": {
            "speedup_over_one_core": DECODE_GOAL,
            "top1_agreement": AGREEMENT_GOAL,
            "met": combined / per_core >= DECODE_GOAL and agreement >= AGREEMENT_GOAL,
        },
        "time_left_s": round(budget.left(), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU only, seconds, nothing installed")
    ap.add_argument("--model-dir", type=Path, default=Path("models/efficientnet-lite0"))
    ap.add_argument("--out-dir", type=Path, help="default bench/results (a temp dir if dry)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting steps after")
    ap.add_argument("--reserve-s", type=float, default=150.0, help="kept for the decode part")
    args = ap.parse_args()
    args.raw_s = 0.3 if args.dry_run else 2.0
    args.items_per_batch = 3 if args.dry_run else 30
    budget = Budget(args.budget_s)
    out_dir = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="bench-gpu-dry-")) if args.dry_run else Path("bench/results")
    )
    info = machine()
    device = "cpu (dry run)" if args.dry_run else (info.get("gpu") or "no GPU found")
    with tempfile.TemporaryDirectory(prefix="trt-cache-") as cache:
        inference = inference_part(args, budget, Path(cache))
        decode = decode_part(args, budget, Path(cache))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, doc in (("inference-gpu", inference), ("decode-gpu", decode)):
        doc |= {"device": device, "dry_run": args.dry_run, "machine": info, "measured_at": stamp}
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}: {json.dumps(doc.get('goal'))}")


if __name__ == "__main__":
    main()
