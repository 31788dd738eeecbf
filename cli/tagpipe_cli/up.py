"""`tagpipe up`: the whole stack in the foreground until Ctrl-C, dead workers restarted."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType

from tagpipe_cli.servers import ServerStartError
from tagpipe_cli.stack import DEFAULT_MODEL_DIR, Stack, StackConfig
from tagpipe_cli.supervise import Supervisor


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("up", help="run NATS, Redis, gateway, downloaders and inference")
    p.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    p.add_argument("--downloaders", type=int, default=1, help="downloader processes")
    p.add_argument("--inference", type=int, default=1, help="inference processes")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--data-dir", type=Path, default=Path(".tagpipe"), help="servers' data, logs")
    p.add_argument("--fresh", action="store_true", help="wipe the data dir first")
    p.add_argument(
        "--ha",
        action="store_true",
        help="past one node: 3 NATS servers (JetStream cluster, R3 streams) and a Redis "
        "Sentinel set (primary, 2 replicas, 3 sentinels), to watch a failover locally",
    )
    p.add_argument(
        "--allow-cidrs",
        default="",
        help="downloader SSRF allowlist, e.g. 127.0.0.0/8 to fetch from a local server",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9100,
        help="each process's /metrics: the gateway on this port, then the workers on the next",
    )
    p.set_defaults(func=run)


def print_metrics(stack: Stack) -> None:
    print("metrics (Prometheus text; `tagpipe status` for a live view):")
    for svc in stack.services:
        print(f"  {svc.name:<14} {svc.metrics_url}")
    print("", flush=True)


def print_servers(stack: Stack) -> None:
    """What to kill -9 to watch a failover: every server's pid and port."""
    print(f"NATS  {stack.nats_url}  (streams at R{stack.stream_replicas})")
    print(f"Redis {stack.redis_url}")
    for srv in stack.server_processes:
        pid = srv.proc.pid if srv.proc is not None else "-"
        print(f"  {srv.log_path.stem:<18} port {srv.port:<6} pid {pid}")
    print("", flush=True)


def run(args: argparse.Namespace) -> int:
    if not (args.model_dir / "model.onnx").exists():
        print(f"tagpipe up: no model in {args.model_dir}: run `make model`")
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    # Before starting children, so a Ctrl-C during start-up still cleans up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    config = StackConfig(
        data_dir=args.data_dir,
        port=args.port,
        downloaders=args.downloaders,
        inference=args.inference,
        model_dir=args.model_dir,
        allow_cidrs=args.allow_cidrs,
        fresh=args.fresh,
        metrics_port=args.metrics_port,
        nats_servers=3 if args.ha else 1,
        redis_sentinel=args.ha,
    )
    stack = Stack(config)
    print(f"starting tagpipe (logs in {stack.log_dir}/) ...", flush=True)
    try:
        stack.start()
    except ServerStartError as exc:
        print(f"tagpipe up: {exc}")
        return 1
    print(f"tagpipe is up: {stack.gateway_url}  (Ctrl-C stops everything)", flush=True)
    if args.ha:
        print_servers(stack)
    print_metrics(stack)
    try:
        # A worker that dies is restarted; a crash loop stops everything (supervise.py).
        code = Supervisor(stack).run(stop)
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    print("stopped", flush=True)
    return code
