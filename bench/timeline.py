"""A twice-a-second timeline of a local stack's bulk run: each service's cores
and each stage's backlog (`timeline` in e2e.json's tagpipe rows).

It shows where a 2-core run leaves cores idle: in `make bench` the downloader
runs ahead of inference, the inference stream's backlog grows through the run,
and once the downloads are done inference finishes that backlog alone, on
fewer than 2 cores. `summary()` puts that tail in numbers.

The sampler runs in the harness process (psutil reads and two JetStream
consumer-info requests per stage and sample), outside what CpuMeter charges to
the stack but for those requests' share of nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
from tagpipe_common.nats_io import close_nats, connect_nats
from tagpipe_common.streams import stage_backlog
from tagpipe_common.subjects import Stage


def _cpu_s(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
    except psutil.Error:  # a service that exited: the run fails elsewhere, with its log
        return 0.0
    return float(t.user + t.system)


@dataclass
class Timeline:
    stack: Any  # tagpipe_cli.stack.Stack
    every_s: float = 0.5
    prefix: str = "tagpipe"
    rows: list[dict[str, Any]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Timeline:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        procs = {s.name: psutil.Process(s.proc.pid) for s in self.stack.services if s.proc}
        nc = await connect_nats(self.stack.nats_url.split(","), "bench-timeline")
        js = nc.jetstream()
        t0, last = time.monotonic(), {k: _cpu_s(p) for k, p in procs.items()}
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.every_s)
                now, t = {k: _cpu_s(p) for k, p in procs.items()}, time.monotonic() - t0
                row: dict[str, Any] = {"t": round(t, 2)}
                row["cores"] = {k: round((now[k] - last[k]) / self.every_s, 2) for k in now}
                row["backlog"] = {
                    stage.value: await stage_backlog(js, stage, self.prefix)
                    for stage in (Stage.DOWNLOAD, Stage.INFER)
                }
                self.rows.append(row)
                last = now
        finally:
            await close_nats(nc)

    def summary(self) -> dict[str, Any]:
        """When the downloads were done, and the cores the services used before and after."""
        download = [r["backlog"][Stage.DOWNLOAD.value] for r in self.rows]
        started = next((i for i, b in enumerate(download) if b > 0), None)
        if started is None:
            return {}
        done = next(
            (r["t"] for r in self.rows[started:] if r["backlog"][Stage.DOWNLOAD.value] == 0), None
        )
        if done is None:
            return {}

        def mean_cores(rows: list[dict[str, Any]]) -> float | None:
            totals = [sum(r["cores"].values()) for r in rows]
            return round(sum(totals) / len(totals), 2) if totals else None

        before = [r for r in self.rows if r["t"] <= done]
        after = [r for r in self.rows if r["t"] > done]
        return {
            "seconds": self.rows[-1]["t"],
            "downloads_done_at_s": done,
            "service_cores_until_then": mean_cores(before),
            "service_cores_after": mean_cores(after),
            "inference_backlog_then": before[-1]["backlog"][Stage.INFER.value],
        }
