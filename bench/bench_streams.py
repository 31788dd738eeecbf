"""One work-queue stream's cost: msgs/s, bytes/s and nats-server CPU per message
and per MB, at R1 (one server) and R3 (the local 3-node cluster `tagpipe up --ha`
starts), for the pipeline's real message sizes.

    python -m bench.bench_streams            (what `make bench-streams` runs, ~2 min)
    python -m bench.bench_streams --quick    (a smoke run, ~40 s)

Each case is the real stream and consumer config (StreamPolicy: work queue, file
storage, explicit acks, the dedupe window, so every publish carries a
Nats-Msg-Id as the services' do), one publisher and one pull consumer in this
process, the backlog held under a window so the stream is in steady state.
On 2 shared cores the client and the servers compete, so the wall-clock msgs/s
is this box's, not the server's: the figure to carry forward is the servers'
CPU per message and per MB (psutil on the nats-server processes), and what one
core of nats-server would carry at that cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import psutil
from nats.aio.client import Client
from tagpipe_cli.nats_cluster import NatsCluster
from tagpipe_cli.servers import ServerProcess, nats_server
from tagpipe_cli.streamplan import download_task_bytes, inference_task_bytes
from tagpipe_common.streams import StreamPolicy
from tagpipe_common.subjects import Lane, Stage, stage_names

from bench.bench_e2e import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WINDOW = 512  # published and not yet acked: a steady backlog, not a growing one
PUBLISH_CONCURRENCY = 64
FETCH_BATCH = 64


def load_average() -> dict[str, float]:
    """The box's 1/5/15-minute load: on a shared box, how busy it was around a run."""
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)}


def shared_note(before: dict[str, float], after: dict[str, float]) -> str:
    """Says whether the box was shared: a load average above its cores means other
    work competed for them, so wall-clock rates are this box's at that moment."""
    cores = os.cpu_count() or 1
    peak = max(before["1m"], after["1m"])
    if peak <= cores:
        return f"quiet: 1-minute load average <= {peak:g} on {cores} cores"
    return f"shared with other work: 1-minute load average up to {peak:g} on {cores} cores"


def message_sizes() -> dict[str, int]:
    """Bytes on the wire per message: the download task and each inference hop frame
    (header + the median payload bench-hop measured on real photos)."""
    sizes = {"download-task": download_task_bytes()}
    for hop in ("raw", "jpeg", "original", "webp-lossless"):
        sizes[f"infer-{hop}"] = inference_task_bytes(hop, RESULTS)[0]
    return sizes


@dataclass
class Counts:
    published: int = 0
    acked: int = 0


async def _publisher(nc: Client, subject: str, body: bytes, n: Counts, stop: asyncio.Event) -> None:
    js = nc.jetstream()
    seq = 0
    while not stop.is_set():
        if n.published - n.acked >= WINDOW:
            await asyncio.sleep(0.001)
            continue
        ids = [f"m{seq + i}-{os.getpid()}" for i in range(PUBLISH_CONCURRENCY)]
        seq += PUBLISH_CONCURRENCY
        await asyncio.gather(*(js.publish(subject, body, headers={"Nats-Msg-Id": i}) for i in ids))
        n.published += len(ids)


async def _consumer(nc: Client, stream: str, durable: str, n: Counts, stop: asyncio.Event) -> None:
    sub = await nc.jetstream().pull_subscribe_bind(durable, stream)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(FETCH_BATCH, timeout=0.5)
        except nats.errors.TimeoutError:
            continue
        for m in msgs:
            await m.ack()  # explicit ack, fire-and-forget as the workers' are
        n.acked += len(msgs)


def _cpu_s(procs: list[psutil.Process]) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in procs]


async def one_case(
    urls: list[str], servers: list[ServerProcess], replicas: int, label: str, size: int, secs: float
) -> dict[str, Any]:
    policy = StreamPolicy(prefix=f"bs{label.replace('-', '')}r{replicas}", replicas=replicas)
    names = stage_names(Stage.INFER, policy.prefix)
    nc = await nats.connect(servers=urls, connect_timeout=5)
    try:
        js = nc.jetstream()
        await js.add_stream(policy.stream_config(Stage.INFER))
        await js.add_consumer(names.stream, policy.consumer_config(Stage.INFER, Lane.BULK))
        body = os.urandom(size)
        n, stop = Counts(), asyncio.Event()
        tasks = [
            asyncio.create_task(_publisher(nc, names.subject(Lane.BULK), body, n, stop)),
            asyncio.create_task(_consumer(nc, names.stream, names.consumer(Lane.BULK), n, stop)),
        ]
        await asyncio.sleep(min(1.0, secs / 3))  # warm-up: the window fills
        procs = [psutil.Process(s.proc.pid) for s in servers if s.proc is not None]
        me = psutil.Process()
        srv0, me0, acked0, t0 = _cpu_s(procs), sum(me.cpu_times()[:2]), n.acked, time.perf_counter()
        await asyncio.sleep(secs)
        srv1, me1, acked1, t1 = _cpu_s(procs), sum(me.cpu_times()[:2]), n.acked, time.perf_counter()
        stop.set()
        await asyncio.gather(*tasks)
        await js.delete_stream(names.stream)
    finally:
        await nc.close()
    msgs, wall = acked1 - acked0, t1 - t0
    per_server = [b - a for a, b in zip(srv0, srv1, strict=True)]
    server_s = sum(per_server)
    mb = msgs * size / 1e6
    return {
        "replicas": replicas,
        "message": label,
        "bytes": size,
        "seconds": round(wall, 2),
        "msgs": msgs,
        "msgs_per_s": round(msgs / wall, 1),
        "mb_per_s": round(mb / wall, 2),
        "server_cpu_cores": round(server_s / wall, 3),
        "server_cpu_cores_each": [round(c / wall, 3) for c in per_server],
        "client_cpu_cores": round((me1 - me0) / wall, 3),
        "server_cpu_us_per_msg": round(server_s / msgs * 1e6, 1) if msgs else None,
        "server_cpu_ms_per_mb": round(server_s / mb * 1e3, 2) if mb else None,
        # What one core of nats-server carries at this cost (all of a cluster's
        # servers together: at R3 the leader and its two followers).
        "per_server_core_msgs_per_s": round(msgs / server_s) if server_s else None,
        "per_server_core_mb_per_s": round(mb / server_s, 1) if server_s else None,
    }


def start_servers(replicas: int, tmp: Path) -> tuple[list[ServerProcess], NatsCluster | None]:
    if replicas == 1:
        return [nats_server(tmp / "r1").start()], None
    cluster = NatsCluster(tmp / "r3", replicas).start()
    return cluster.servers, cluster


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = message_sizes()
    rows: list[dict[str, Any]] = []
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        for replicas in (1, 3):
            servers, cluster = start_servers(replicas, Path(tmp))
            try:
                for label, size in sizes.items():
                    urls = [s.url for s in servers]
                    row = await one_case(urls, servers, replicas, label, size, args.seconds)
                    rows.append(row)
                    print(
                        f"R{replicas} {label:<14} {size:>7} B  {row['msgs_per_s']:>8} msg/s "
                        f"{row['mb_per_s']:>7} MB/s  server {row['server_cpu_us_per_msg']} us/msg "
                        f"{row['server_cpu_ms_per_mb']} ms/MB",
                        flush=True,
                    )
            finally:
                if cluster is not None:
                    cluster.stop()
                else:
                    servers[0].stop()
    load_after = load_average()
    return {
        "benchmark": "streams",
        "machine": {**machine(), "load_average_before": load_before},
        "load_average_after": load_after,
        "box": shared_note(load_before, load_after),
        "setup": {
            "client": "one Python process (nats-py): a publisher and a pull consumer",
            "window": WINDOW,
            "publish_concurrency": PUBLISH_CONCURRENCY,
            "fetch_batch": FETCH_BATCH,
            "seconds_per_case": args.seconds,
            "sizes": "streamplan: DownloadTask JSON; InferenceTask header + bench-hop's median",
        },
        "rows": rows,
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per case")
    ap.add_argument("--quick", action="store_true", help="1.5 s per case")
    ap.add_argument(
        "--out", type=Path, help="default: bench/results/streams.json (--quick: a temp dir)"
    )
    args = ap.parse_args()
    # A smoke run never overwrites the committed figures.
    quick_out = Path(tempfile.gettempdir()) / "tagpipe-bench-streams-quick.json"
    args.out = args.out or (quick_out if args.quick else RESULTS / "streams.json")
    if args.quick:
        args.seconds = 1.5
    doc = asyncio.run(run(args))
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
