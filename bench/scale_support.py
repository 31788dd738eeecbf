"""bench_scale's parts: a tiny model for the harness, per-process CPU, the plot."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from tagpipe_common.manifest import ModelManifest, sha256_file

CROP = 32
CLASSES = 8


def tiny_model(model_dir: Path) -> Path:
    """A model directory in the real manifest format whose model costs next to
    nothing: global average pool of a 32x32 crop, then one 3x8 matrix multiply.
    For this harness only: with it one inference process outruns many downloaders,
    so the download tier is what gets measured. Its tags mean nothing."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((3, CLASSES)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, CROP, CROP])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime in the lock
    onnx.checker.check_model(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / "model.onnx")
    (model_dir / "labels.txt").write_text("".join(f"class-{i}\n" for i in range(CLASSES)))
    ModelManifest.model_validate(
        {
            "name": "tiny-scale-bench",
            "version": "1",
            "sha256": sha256_file(model_dir / "model.onnx"),
            "num_classes": CLASSES,
            "input": {"name": "input"},
            "output": {"name": "logits"},
            "preprocess": {
                "resize": CROP,
                "crop": CROP,
                "interpolation": "bilinear",
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
            },
        }
    ).save(model_dir)
    return model_dir


def _group(name: str) -> str:
    return name.rstrip("0123456789").rstrip("-")


class Meter:
    """CPU seconds per process group (gateway, downloader, inference, nats, redis,
    imageserver, harness) over a window, in cores, and how busy the whole box was."""

    def __init__(self, stack: Any, server_pid: int) -> None:
        self.procs: dict[str, list[psutil.Process]] = {}
        named = [(_group(s.name), s.proc.pid) for s in stack.services if s.proc is not None]
        named += [(s.name, s.proc.pid) for s in stack.server_processes if s.proc is not None]
        named += [("imageserver", server_pid), ("harness", os.getpid())]
        for group, pid in named:
            self.procs.setdefault(group, []).append(psutil.Process(pid))
        self.t0 = time.perf_counter()
        self.box0 = psutil.cpu_times()
        self.cpu0 = {g: self._cpu(ps) for g, ps in self.procs.items()}

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> float:
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):  # a process that exited mid-window
                total += sum(p.cpu_times()[:2])
        return total

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        box1 = psutil.cpu_times()
        cores = {g: round((self._cpu(ps) - self.cpu0[g]) / wall, 3) for g, ps in self.procs.items()}
        busy0 = sum(self.box0) - self.box0.idle - getattr(self.box0, "iowait", 0.0)
        busy1 = sum(box1) - box1.idle - getattr(box1, "iowait", 0.0)
        total = sum(box1) - sum(self.box0)
        ours = sum(cores.values())
        box_cores = (busy1 - busy0) / wall
        return {
            "cores": cores,
            "ours_cores": round(ours, 3),
            "box_busy": round((busy1 - busy0) / total, 3) if total else None,
            "box_cores_busy": round(box_cores, 2),
            "others_cores": round(max(0.0, box_cores - ours), 2),
            "biggest": max(cores, key=lambda g: cores[g]),
        }


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, marker in (("before", "s"), ("after", "o")):
        rows = sorted((r for r in doc["rows"] if r["mode"] == mode), key=lambda r: r["slots_total"])
        if not rows:
            continue
        x = [r["slots_total"] for r in rows]
        axes[0].plot(x, [r["inflight"] for r in rows], marker=marker, label=mode)
        axes[1].plot(x, [r["bound_share"] for r in rows], marker=marker, label=mode)
        for r in rows:  # latency differs between rows: name each point
            label = f"{r['replicas']}x{r['slots']}@{r['latency_s']:g}s"
            axes[1].annotate(label, (r["slots_total"], r["bound_share"]), fontsize=7)
    xs = sorted({r["slots_total"] for r in doc["rows"]})
    axes[0].plot(xs, [0.9 * x for x in xs], "k:", label="90 % of replicas x slots")
    axes[1].axhline(0.85, color="k", linestyle=":", label="goal: 85 % of the bound")
    axes[0].set(xscale="log", yscale="log", xlabel="replicas x slots", ylabel="in flight")
    axes[1].set(xscale="log", ylim=(0, 1.1), xlabel="replicas x slots")
    axes[1].set_ylabel("throughput / (replicas x slots / latency)")
    axes[0].set_title("in-flight downloads (num_ack_pending)")
    axes[1].set_title("throughput against Little's law")
    for ax in axes:
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"make bench-scale: {doc['machine']['cores']} cores, {doc['finished_at']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
