"""Kubernetes API calls per scaling tick, per TagPipeline, in steady state.

Runs the operator in-process (the same `register()` as `tagpipe-operator`) against
kmock, which records every request, and a real NATS; one TagPipeline, no backlog, so
nothing scales and every request in the window is the steady-state cost. The window is
counted in ticks: each tick writes the status once (PATCH .../status). kopf's watches
are long-lived streams (one request each, opened before the window).

    .venv/bin/python bench/operator_api_calls.py --label after
    # the code before issue 30, for comparison:
    git archive 343c9ce operator/tagpipe_operator | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before/operator .venv/bin/python bench/operator_api_calls.py --label before

Results: bench/results/operator-api-calls.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import kmock
import kopf
from tagpipe_cli.servers import nats_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagpipe_operator import handlers  # noqa: E402
from tagpipe_operator.settings import OperatorSettings  # noqa: E402

from tests.integration.kmock_kit import ApplyingEmulator, serve  # noqa: E402
from tests.kube_rest import KubeClient  # noqa: E402

NS, NAME = "bench", "tp1"


def pipeline(nats_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "tagpipe.io/v1alpha1",
        "kind": "TagPipeline",
        "metadata": {"name": NAME, "namespace": NS, "uid": "uid-bench", "generation": 1},
        "spec": {
            "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
            "nats": {"url": nats_url, "prefix": "bench"},
            "redis": {"url": "redis://127.0.0.1:6379/0"},
            "inference": {"gpu": 0},
        },
    }


def key(req: Any) -> str:
    res = req.resource.plural if req.resource is not None else str(req.url.path)
    sub = f"/{req.subresource}" if req.subresource else ""
    watch = str(req.params.get("watch", "")).lower() in ("1", "true")
    verb = "WATCH" if watch else str(getattr(req.method, "value", req.method)).upper()
    return f"{verb} {res}{sub}"


async def measure(ticks: int, interval: float, settle: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        nats = nats_server(Path(tmp) / "nats").start()
        try:
            async with ApplyingEmulator() as km, kmock.Server(km):
                return await _measure(km, nats.url, ticks, interval, settle)
        finally:
            nats.stop()


async def _measure(
    km: Any, nats_url: str, ticks: int, interval: float, settle: float
) -> dict[str, Any]:
    serve(km)
    conn = kopf.ConnectionInfo(server=str(km.url), insecure=True)
    settings = OperatorSettings(scale_interval_s=interval, nats_timeout_s=1.0)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings, connection=conn)
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(registry=registry, standalone=True, clusterwide=True, stop_flag=stop)
    )
    user = KubeClient.from_connection(conn)
    try:
        await user.create(pipeline(nats_url))
        await asyncio.sleep(settle)  # children made, streams ensured, ticks running
        start = len(list(km))
        began = time.monotonic()
        await asyncio.sleep(interval * ticks)
        everything = list(km)[start:]
    finally:
        await user.close()
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=15)
    by_call = Counter(key(r) for r in everything)
    ticked = by_call["PATCH tagpipelines/status"]
    return {
        "window_s": round(time.monotonic() - began, 2),
        "ticks": ticked,
        "requests": len(everything),
        "per_tick": round(len(everything) / max(ticked, 1), 2),
        "by_call": dict(sorted(by_call.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--settle", type=float, default=15.0, help="seconds before the window")
    parser.add_argument("--out", default=str(ROOT / "bench/results/operator-api-calls.json"))
    args = parser.parse_args()
    result = asyncio.run(measure(args.ticks, args.interval, args.settle))
    cpus = os.cpu_count()
    result["machine"] = f"{platform.machine()}, {cpus} CPUs, python {platform.python_version()}"
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.label] = result
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(args.label, json.dumps(result))


if __name__ == "__main__":
    main()
