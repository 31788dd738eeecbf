"""CPU accounting for a run: what the system under test used, and what others did.

The benchmark box is shared, so wall-clock throughput moves with whatever
else runs. Two figures make a run readable anyway: CPU-seconds per image of
the system's own processes (its efficiency, little affected by neighbours)
and the cores the rest of the machine used meanwhile (the noise level).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    # children_*: reaped children (short-lived helpers) count towards their parent.
    return float(t.user + t.system + t.children_user + t.children_system)


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _name(p: psutil.Process) -> str:
    """A short label: the console script or module a Python process runs, else its name."""
    cmd: list[str] = [str(a) for a in p.cmdline()]
    if any("multiprocessing" in a for a in cmd):
        return "worker (multiprocessing)"  # e.g. uvicorn --workers children
    for i, arg in enumerate(cmd):
        if arg == "-m" and i + 1 < len(cmd):
            return cmd[i + 1].rsplit(".", 1)[-1]
        if "tagpipe-" in arg or arg.endswith(("uvicorn", "raylet", "gcs_server")):
            return arg.rsplit("/", 1)[-1]
    name = str(p.name())
    return name if name not in ("python", "python3") else (str(cmd[1]) if len(cmd) > 1 else name)


@dataclass
class CpuMeter:
    """Own process (if `include_self`) plus all descendants, minus `exclude` subtrees."""

    include_self: bool = False
    exclude: set[int] = field(default_factory=set)
    _start: dict[int, float] = field(default_factory=dict)
    _t0: float = 0.0
    _busy0: float = 0.0
    _harness0: dict[int, float] = field(default_factory=dict)
    _names: dict[int, str] = field(default_factory=dict)

    def _collect(self) -> tuple[dict[int, float], dict[int, float]]:
        """(system under test, harness: the bench process and the excluded subtrees)."""
        me = psutil.Process(os.getpid())
        skip: set[int] = set()
        for pid in self.exclude:
            try:
                skip |= {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
            except psutil.NoSuchProcess:
                continue
        ours: dict[int, float] = {}
        harness: dict[int, float] = {}
        for p in [me, *me.children(recursive=True)]:
            mine = p.pid not in skip and (p.pid != me.pid or self.include_self)
            try:
                (ours if mine else harness)[p.pid] = _cpu(p)
                self._names.setdefault(p.pid, _name(p))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return ours, harness

    def start(self) -> None:
        self._start, self._harness0 = self._collect()
        self._t0 = time.perf_counter()
        self._busy0 = _machine_busy()

    def stop(self, images: int) -> dict[str, Any]:
        ours_now, harness_now = self._collect()
        wall = time.perf_counter() - self._t0
        ours = sum(v - self._start.get(pid, 0.0) for pid, v in ours_now.items())
        harness = sum(v - self._harness0.get(pid, 0.0) for pid, v in harness_now.items())
        machine = _machine_busy() - self._busy0
        by_name: dict[str, float] = {}
        for pid, v in ours_now.items():
            name = self._names.get(pid, "?")
            by_name[name] = by_name.get(name, 0.0) + (v - self._start.get(pid, 0.0)) / wall
        return {
            # Which process burns the cores: where a pipeline's stage binds.
            "cores_by_process": {k: round(v, 2) for k, v in sorted(by_name.items()) if v >= 0.01},
            "cpu_s": round(ours, 2),
            "cpu_ms_per_image": round(1000 * ours / images, 2) if images else 0.0,
            "cores_used": round(ours / wall, 2),
            "harness_cores": round(harness / wall, 2),
            # Everyone else on the box: the noise this run was measured under.
            "other_cores_busy": round(max(0.0, machine - ours - harness) / wall, 2),
        }
