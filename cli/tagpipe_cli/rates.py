"""Per-replica throughput figures for `plan` and `simulate`, with their source.

Order of precedence: a command-line flag, then a measurement in bench/results/,
then a default taken from the public/measured figures in the platform notes.
Every figure carries where it came from, and the output prints it, so nobody
mistakes an assumption for a measurement.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagpipe_cli.gpurates import to_t4

# Assumptions, used only when neither a flag nor a bench result gives the figure.
# EfficientNet-Lite0, onnxruntime CPU, one replica = 2 threads: notes say 92-148 img/s.
DEFAULT_CPU_INFER = 110.0
# T4: public figures are ResNet-50 ORT+TRT FP16 ~1,280 img/s and MobileNet INT8
# ~17,700 img/s. Lite0 has ~10x fewer FLOPs than ResNet-50 but depthwise convs
# use a GPU poorly; 4,000 img/s at FP16 is a deliberately middle estimate.
DEFAULT_T4_INFER = 4000.0
# One downloader replica = 1 core. 640x480 decode+resize ~5 ms, plus fetch and
# publish overhead; a 12 MP JPEG with DCT-scaled decode ~45-56 ms.
DEFAULT_DOWNLOAD = {"thumb": 150.0, "phone": 18.0}


@dataclass(frozen=True)
class Rate:
    value: float  # images/s one replica sustains
    source: str


@dataclass(frozen=True)
class StageRates:
    download: dict[str, Rate]  # per image class
    cpu_inference: Rate
    gpu_inference: Rate
    # decode: gpu, decode + inference on one T4 (None: never measured, not planned).
    gpu_decode: Rate | None = None

    def sources(self) -> dict[str, str]:
        out = {
            f"downloader/{c}": f"{r.value:g} img/s ({r.source})" for c, r in self.download.items()
        }
        out["inference/cpu"] = f"{self.cpu_inference.value:g} img/s ({self.cpu_inference.source})"
        out["inference/t4"] = f"{self.gpu_inference.value:g} img/s ({self.gpu_inference.source})"
        if self.gpu_decode is not None:
            d = self.gpu_decode
            out["decode+inference/t4 (decode: gpu)"] = f"{d.value:.0f} img/s ({d.source})"
        return out


def _walk(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], float]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, str(i)))
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield path, float(obj)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _best(doc: Any, must: tuple[str, ...], rate_keys: tuple[str, ...]) -> float | None:
    """Highest throughput figure whose key path mentions every word in `must`.

    The bench files are written by other tools whose exact layout may change;
    matching on meaning (a rate key under a path naming the class) keeps this
    reader from breaking on an extra nesting level. Highest, because a bench
    sweeps settings and a deployment runs the best one.
    """
    found = [
        value
        for path, value in _walk(doc)
        if path
        and path[-1] in rate_keys
        and all(any(m in part.lower() for part in path) for m in must)
    ]
    return max(found) if found else None


RATE_KEYS = ("images_per_s", "img_per_s", "throughput", "images_per_sec", "rate")
# A bench sweeps rounds; its headline (median) is the figure to plan on, not the
# luckiest round.
MEDIAN_KEYS = (*(f"{k}_median" for k in RATE_KEYS), "service_images_per_s")
# The downloader bench names image classes by their size.
CLASS_ALIASES = {"thumb": "640x480", "phone": "4032x3024"}


def _cores(doc: Any) -> int:
    """Cores of the machine a bench ran on (its `machine` block), default 1."""
    machine = doc.get("machine", {}) if isinstance(doc, dict) else {}
    for key in ("cpu_cores", "cores", "physical_cores"):
        if isinstance(machine.get(key), int) and machine[key] > 0:
            return int(machine[key])
    return 1


def measured_download(results_dir: Path, image_class: str) -> Rate | None:
    """Per downloader core: the bench runs one process over all the machine's
    cores, and the planner's downloader replica is one core (decode scales with
    cores; the bench's thread-scaling table is the check on that)."""
    path = results_dir / "downloader.json"
    doc = _load(path)
    token = CLASS_ALIASES.get(image_class, image_class)
    value = _best(doc, (token,), MEDIAN_KEYS) or _best(doc, (token,), RATE_KEYS)
    if not value:
        return None
    cores = _cores(doc)
    return Rate(value / cores, f"measured, {path}: {value:g} img/s over {cores} cores")


def measured_cpu_inference(results_dir: Path) -> Rate | None:
    path = results_dir / "inference-cpu.json"
    doc = _load(path)
    value = _best(doc, (), MEDIAN_KEYS) or _best(doc, (), RATE_KEYS)
    return Rate(value, f"measured, {path}") if value else None


def add_rate_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-replica rates (override bench/results and defaults)")
    g.add_argument("--download-rate", action="append", default=[], metavar="CLASS=IMG_PER_S")
    g.add_argument("--cpu-infer-rate", type=float, help="img/s per 2-core inference replica")
    g.add_argument(
        "--t4-infer-rate",
        type=float,
        help="img/s per T4 GPU (default: bench/results/inference-gpu.json, scaled to a T4; "
        f"without it {DEFAULT_T4_INFER:g}, an assumption from public figures)",
    )


def resolve(args: argparse.Namespace) -> StageRates:
    results_dir: Path = args.results_dir
    flagged: dict[str, float] = {}
    for item in args.download_rate:
        name, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--download-rate {item!r} is not CLASS=IMG_PER_S")
        flagged[name] = float(val)
    download: dict[str, Rate] = {}
    for cls in sorted(set(DEFAULT_DOWNLOAD) | set(flagged)):
        if cls in flagged:
            download[cls] = Rate(flagged[cls], "flag")
        else:
            download[cls] = measured_download(results_dir, cls) or Rate(
                DEFAULT_DOWNLOAD[cls], "assumed, platform notes"
            )
    if args.cpu_infer_rate is not None:
        cpu = Rate(args.cpu_infer_rate, "flag")
    else:
        cpu = measured_cpu_inference(results_dir) or Rate(DEFAULT_CPU_INFER, "assumed, notes")
    return StageRates(download, cpu, _t4(args, results_dir), _t4_decode(results_dir))


def _t4(args: argparse.Namespace, results_dir: Path) -> Rate:
    if args.t4_infer_rate is not None:
        return Rate(args.t4_infer_rate, "flag")
    # The service's rate, not raw onnxruntime's: a replica delivers what the service does.
    measured = to_t4(results_dir / "inference-gpu.json", "service_images_per_s")
    if measured is not None:
        return Rate(*measured)
    return Rate(DEFAULT_T4_INFER, "assumed, public figures")


def _t4_decode(results_dir: Path) -> Rate | None:
    measured = to_t4(results_dir / "decode-gpu.json", "gpu_decode_and_inference_images_per_s")
    return Rate(*measured) if measured is not None else None
