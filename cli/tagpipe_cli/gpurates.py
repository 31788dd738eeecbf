"""GPU rates for `plan`: from `make bench-gpu`'s results, scaled to a T4 when
they were measured on another GPU, with the factor stated.

The plan provisions T4s, but a bench may run on whatever GPU is lent. Scaling
by one number hides a lot (EfficientNet-Lite0's depthwise convolutions are
bound by memory more than by tensor cores), so the factor is the smaller of two
datasheet ratios, FP16 tensor throughput and memory bandwidth: the T4 is
assumed to be held back by whichever it lacks most, which errs towards more
GPUs, never fewer. Every figure says where it came from; a dry run (the bench
on CPU) is never read as a measurement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Datasheet figures: dense FP16 tensor TFLOPS, memory GB/s.
GPUS: dict[str, tuple[float, float]] = {
    "T4": (65.0, 320.0),
    "L4": (121.0, 300.0),
    "A10": (125.0, 600.0),
    "V100": (125.0, 900.0),
    "L40S": (362.0, 864.0),
    "A100": (312.0, 1935.0),
    "H100": (989.0, 3350.0),
    "H200": (989.0, 4800.0),
}
T4 = "T4"


@dataclass(frozen=True)
class Scale:
    gpu: str
    factor: float
    why: str


def gpu_model(device: str) -> str | None:
    """The GPUS key a device name (as nvidia-smi prints it) names, if any."""
    words = device.upper().replace("-", " ").split()
    for name in sorted(GPUS, key=len, reverse=True):  # L40S before L4, A100 before A10
        if name in words:
            return name
    return None


def t4_scale(device: str) -> Scale | None:
    name = gpu_model(device)
    if name is None:
        return None
    tf, bw = GPUS[name]
    t4_tf, t4_bw = GPUS[T4]
    factor = min(t4_tf / tf, t4_bw / bw)
    why = (
        f"x {factor:.3f} = min(FP16 TFLOPS {t4_tf:g}/{tf:g}, memory {t4_bw:g}/{bw:g} GB/s), "
        f"T4 over {name}"
    )
    return Scale(name, factor, why)


def _measured(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("dry_run") or not isinstance(doc.get("device"), str):
        return None
    return doc


def to_t4(path: Path, key: str) -> tuple[float, str] | None:
    """(images/s on one T4, where it came from) from `key` of a bench-gpu file."""
    doc = _measured(path)
    value = doc.get(key) if doc else None
    if doc is None or not isinstance(value, int | float) or value <= 0:
        return None
    device = doc["device"]
    scale = t4_scale(device)
    if scale is None:
        return None  # a GPU this table does not know: no honest factor
    # Which runtime measured it (onnxruntime-gpu or torch), when the file says.
    where = (
        f"{path}, {doc['runtime']} runtime" if isinstance(doc.get("runtime"), str) else str(path)
    )
    if scale.gpu == T4:
        return float(value), f"measured, {where}: {device}"
    return value * scale.factor, f"scaled from {device} {value:g} img/s ({where}) {scale.why}"
