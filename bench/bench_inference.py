"""Inference benchmark: raw onnxruntime vs the service draining a pre-filled stream.

One run, one machine, same model and thread settings for both halves:
1. raw: `session.run` on ready-made float32 batches of 1, 8 and 32 images;
2. service: the real `InferenceWorker` (fetch, decode, normalise, infer, store in
   Redis, ack) draining a JetStream stream pre-filled with uint8 crops, against
   real nats-server and redis-server started via `tagpipe_cli.servers`.
The ratio service/raw says how much the plumbing costs. Writes
bench/results/inference-<device>.json.

Usage: python bench/bench_inference.py [--model-dir models/efficientnet-lite0] [--items 640]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from redis.asyncio import Redis
from tagpipe_cli.servers import ServerProcess, nats_server, redis_server
from tagpipe_common.keys import RedisKeys
from tagpipe_common.messages import InferenceTask
from tagpipe_common.nats_io import connect_nats
from tagpipe_common.results import ResultStore
from tagpipe_common.streams import StreamPolicy, ensure_streams
from tagpipe_common.subjects import HDR_MSG_ID, Lane, Stage, stage_names
from tagpipe_common.telemetry import setup_logging
from tagpipe_inference.model import Model, load_model
from tagpipe_inference.settings import InferenceSettings
from tagpipe_inference.worker import InferenceWorker

BATCHES = (1, 8, 32)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "gpu": None,
    }
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["gpu"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    return info


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_run(model: Model, batch: int, min_s: float) -> tuple[float, float]:
    """(images/s, CPU ms per image) of plain session.run on a preprocessed batch."""
    rng = np.random.default_rng(batch)
    x = model.preprocess(rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8))
    feed = {model.manifest.input.name: x}
    out = [model.manifest.output.name]
    model.session.run(out, feed)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - t0) < min_s or n < 3:
        model.session.run(out, feed)
        n += 1
    return n * batch / elapsed, (time.process_time() - c0) * 1000 / (n * batch)


async def prefill(settings: InferenceSettings, items: int, tag: str) -> None:
    nc = await connect_nats(settings.nats_servers, "bench-prefill")
    js = nc.jetstream()
    await ensure_streams(js, StreamPolicy.from_settings(settings))
    subject = stage_names(Stage.INFER, settings.prefix).subject(Lane.BULK)
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(16)]
    for i in range(items):
        task = InferenceTask(
            item_id=f"{tag}-{i}",
            job_id="bench",
            lane=Lane.BULK,
            shape=(224, 224, 3),
            pixels=pool[i % len(pool)].tobytes(),
        )
        await js.publish(subject, task.to_wire(), headers={HDR_MSG_ID: task.item_id})
    await nc.close()


async def drain(settings: InferenceSettings, model: Model, items: int, tag: str) -> dict[str, Any]:
    """Time the real worker from start until every item is stored and acked."""
    nc = await connect_nats(settings.nats_servers, "bench-worker")
    redis = Redis.from_url(settings.redis_url)
    store = ResultStore(redis, RedisKeys(settings.prefix))
    worker = InferenceWorker(settings, model, nc.jetstream(), store)
    await worker.subscribe()
    t0, c0 = time.perf_counter(), time.process_time()
    task = asyncio.create_task(worker.run())
    while worker.items < items:  # noqa: ASYNC110 (polls a counter: no I/O, no CPU to speak of)
        await asyncio.sleep(0.005)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    worker.stop()
    await task
    ids = [f"{tag}-{i}" for i in range(items)]
    stored = sum(r is not None for r in await store.get_many(ids))
    await nc.close()
    await redis.aclose()
    if stored != items:
        raise SystemExit(f"only {stored}/{items} results stored")
    return {
        "images_per_s": items / elapsed,
        "seconds": elapsed,
        "batches": worker.batches,
        "worker_cpu_ms_per_image": cpu * 1000 / items,
    }


def one_round(
    s: InferenceSettings,
    model: Model,
    servers: list[ServerProcess],
    items: int,
    tag: str,
    raw_s: float,
) -> dict[str, Any]:
    asyncio.run(prefill(s, items, tag))
    raw, raw_cpu = raw_run(model, s.max_batch, raw_s)
    before = sum(proc_cpu_s(p.proc.pid) for p in servers if p.proc)
    svc = asyncio.run(drain(s, model, items, tag))
    servers_cpu = sum(proc_cpu_s(p.proc.pid) for p in servers if p.proc) - before
    svc["servers_cpu_ms_per_image"] = servers_cpu * 1000 / items
    svc["raw_images_per_s"] = raw
    svc["raw_cpu_ms_per_image"] = raw_cpu
    svc["ratio"] = svc["images_per_s"] / raw
    # CPU cost ratio: what the ratio would be if CPU were the only limit.
    total_cpu = svc["worker_cpu_ms_per_image"] + svc["servers_cpu_ms_per_image"]
    svc["cpu_cost_ratio"] = raw_cpu / total_cpu
    svc["cpu_cost_ratio_worker_only"] = raw_cpu / svc["worker_cpu_ms_per_image"]
    svc["load_avg_1m"] = os.getloadavg()[0]
    return svc


def interleaved(
    settings: InferenceSettings, variants: dict[str, Model], items: int, rounds: int, raw_s: float
) -> dict[str, list[dict[str, Any]]]:
    """Alternate raw and service runs (and variants): on a shared machine the load
    drifts, so each service figure is paired with a raw figure taken just before it."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="tagpipe-bench-") as tmp:
        nats = nats_server(Path(tmp) / "nats").start()
        redis = redis_server(Path(tmp) / "redis", persist=False).start()
        try:
            s = settings.model_copy(update={"nats_url": nats.url, "redis_url": redis.url})
            for r in range(rounds):
                for name, model in variants.items():
                    tag = f"{name}-{r}"
                    out[name].append(one_round(s, model, [nats, redis], items, tag, raw_s))
        finally:
            nats.stop()
            redis.stop()
    return out


def rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    mid = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]  # the median round
    cpu = sorted(r["cpu_cost_ratio"] for r in rounds)[len(rounds) // 2]
    cpu_worker = sorted(r["cpu_cost_ratio_worker_only"] for r in rounds)[len(rounds) // 2]
    ratios = [r["ratio"] for r in rounds]
    loads = [r["load_avg_1m"] for r in rounds]
    return {
        "raw_ort_images_per_s": round(mid["raw_images_per_s"], 1),
        "service_images_per_s": round(mid["images_per_s"], 1),
        "ratio": round(mid["ratio"], 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "cpu_cost_ratio_median": round(cpu, 3),
        "cpu_cost_ratio_worker_only_median": round(cpu_worker, 3),
        "load_avg_1m_range": [round(min(loads), 2), round(max(loads), 2)],
        "rounds": [rounded(r) for r in rounds],
    }


def memory_bound(bounded: dict[str, Any], unbounded: dict[str, Any]) -> dict[str, Any]:
    """The memory pattern off (the default) against on (onnxruntime's default). It
    touches session.run only, so the raw session's CPU ms per image, taken in the same
    rounds, isolates its cost. (The batch cap, run_at_most, costs nothing here: the
    bench's batches never exceed max_batch.)"""

    def median(rounds: list[dict[str, Any]], key: str) -> float:
        per = sorted(r[key] for r in rounds)
        return float(per[len(per) // 2])

    def cost_pct(key: str) -> float:
        b, u = median(bounded["rounds"], key), median(unbounded["rounds"], key)
        return round((b / u - 1) * 100, 2)

    # Medians over the rounds (not the median-ratio round's rate, which on a loaded
    # box is one round's luck).
    rate_b = median(bounded["rounds"], "images_per_s")
    rate_u = median(unbounded["rounds"], "images_per_s")
    return {
        "setting": "TAGPIPE_MEM_PATTERN=false (bounded, the default) vs true (unbounded)",
        "bounded_images_per_s_median": round(rate_b, 1),
        "unbounded_images_per_s_median": round(rate_u, 1),
        "throughput_cost_pct": round((1 - rate_b / rate_u) * 100, 2),
        "worker_cpu_ms_per_image_median": {
            "bounded": round(median(bounded["rounds"], "worker_cpu_ms_per_image"), 3),
            "unbounded": round(median(unbounded["rounds"], "worker_cpu_ms_per_image"), 3),
        },
        "worker_cpu_cost_pct": cost_pct("worker_cpu_ms_per_image"),
        "raw_session_cpu_ms_per_image_median": {
            "bounded": round(median(bounded["rounds"], "raw_cpu_ms_per_image"), 3),
            "unbounded": round(median(unbounded["rounds"], "raw_cpu_ms_per_image"), 3),
        },
        "raw_session_cpu_cost_pct": cost_pct("raw_cpu_ms_per_image"),
        "unbounded": unbounded,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("models/efficientnet-lite0"))
    ap.add_argument("--items", type=int, default=320)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--raw-seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    # Production logging (JSON, INFO: a line per batch and per item), sent nowhere.
    setup_logging("inference", "INFO", json_lines=True)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115
    settings = InferenceSettings(
        model_dir=args.model_dir,
        max_batch=args.max_batch,
        intra_op_threads=args.threads,
        inter_op_threads=1,
        health_port=0,
    )

    def load(spinning: bool, bounded: bool = True) -> Model:
        m = load_model(
            settings.model_dir,
            settings.provider_list,
            args.threads,
            1,
            spinning,
            mem_pattern=settings.mem_pattern if bounded else True,
        )
        m.warm_up(settings.max_batch)
        return m

    model = load(settings.allow_spinning)
    # CPU ms per image by batch size: what batching saves on CPU, free of
    # neighbours' noise (wall-clock images/s at batch 1 swings most with load).
    raw_runs = {str(b): raw_run(model, b, args.raw_seconds) for b in BATCHES}
    raw = {k: v[0] for k, v in raw_runs.items()}
    # "unbounded": onnxruntime's default memory pattern (on).
    variants = {"default": model, "spinning": load(True), "unbounded": load(False, False)}
    runs = interleaved(settings, variants, args.items, args.rounds, args.raw_seconds)
    head, spin = summary(runs["default"]), summary(runs["spinning"])
    unbounded = summary(runs["unbounded"])

    gpu_providers = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    device = "gpu" if any(p in model.providers for p in gpu_providers) else "cpu"
    threads = {"intra_op": args.threads, "inter_op": 1}
    doc = {
        "benchmark": "inference",
        "model": f"{model.name} {model.version}",
        "device": device,
        "providers": model.providers,
        "threads": {**threads, "allow_spinning": settings.allow_spinning},
        "batch_size": args.max_batch,
        "raw_ort_images_per_s": head["raw_ort_images_per_s"],
        "service_images_per_s": head["service_images_per_s"],
        "ratio": head["ratio"],
        "ratio_range": head["ratio_range"],
        "cpu_cost_ratio": head["cpu_cost_ratio_median"],
        "cpu_cost_ratio_worker_only": head["cpu_cost_ratio_worker_only_median"],
        "load_avg_1m_range": head["load_avg_1m_range"],
        "raw_ort_images_per_s_by_batch": {k: round(v, 1) for k, v in raw.items()},
        "raw_ort_cpu_ms_per_image_by_batch": {k: round(v[1], 2) for k, v in raw_runs.items()},
        "raw_best_batch": int(max(raw, key=lambda k: raw[k])),
        "service": {
            "items_per_round": args.items,
            "max_wait_ms": settings.max_wait_ms,
            "pipeline_depth": settings.pipeline_depth,
            **head,
        },
        "spinning_threads": spin,
        "memory_bound": memory_bound(head, unbounded),
        "method": (
            "raw: session.run on preprocessed float32 batches of batch_size; service: the "
            "InferenceWorker draining a pre-filled JetStream stream (real nats-server) into "
            "Redis (real redis-server), same session. Raw and service runs alternate, per "
            "variant; headline figures are the median-ratio round. cpu_cost_ratio = raw CPU "
            "ms/image over service CPU ms/image (worker + nats-server + redis-server; "
            "_worker_only: the worker process alone)."
        ),
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    cores, busiest = doc["machine"]["cores"], head["load_avg_1m_range"][1]
    if busiest > cores:
        doc["caveat"] = (
            f"shared machine: 1-minute load average up to {busiest} on {cores} cores while "
            "measuring, so wall-clock images/s (and their ratio) swing from round to round; "
            "cpu_cost_ratio, from CPU time actually spent per image, is the stable figure"
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"inference-{device}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
