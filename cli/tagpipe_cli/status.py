"""`tagpipe status`: a live view of the pipeline, refreshing in place like `top`.

Reads the gateway's `GET /v1/pipeline` (the local stack of `tagpipe up` by default, or
any gateway with `--gateway`) and draws two tables with `rich`: per stage the backlog,
items in flight, images/s over the last minute, mean batch size and live workers; then
the caller's running jobs with their progress. `--once` prints one frame as plain text
(for scripts and tests) and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from tagpipe_cli.client import DEFAULT_GATEWAY, ApiError, _check

DASH = "-"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("status", help="live view of the pipeline (refreshes like top)")
    p.add_argument("--gateway", default=os.environ.get("TAGPIPE_GATEWAY_URL", DEFAULT_GATEWAY))
    p.add_argument(
        "--api-key", default=os.environ.get("TAGPIPE_API_KEY"), help="or env TAGPIPE_API_KEY"
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one view and exit")
    p.set_defaults(func=run)


def _num(value: Any, fmt: str = "{:,}") -> str:
    return DASH if value is None else fmt.format(value)


def stage_table(view: dict[str, Any]) -> Table:
    t = Table(title="stages", title_justify="left", expand=False)
    for col in ("STAGE", "BACKLOG", "IN FLIGHT", "IMAGES/S (1m)", "BATCH", "WORKERS"):
        t.add_column(col, justify="left" if col == "STAGE" else "right")
    for s in view["stages"]:
        t.add_row(
            s["stage"],
            _num(s["backlog"]),
            _num(s["in_flight"]),
            _num(s["images_per_s"], "{:.1f}"),
            _num(s["batch_size"], "{:.1f}"),
            _num(s["workers"]),
        )
    return t


def jobs_table(view: dict[str, Any]) -> Table:
    t = Table(title="running jobs", title_justify="left", expand=False)
    for col in ("JOB", "STATE", "DONE", "FAILED", "TOTAL", "PROGRESS", "RATE/S", "ETA"):
        t.add_column(col, justify="left" if col in ("JOB", "STATE") else "right")
    for j in view["jobs"]:
        total = j.get("total")
        pct = f"{100 * j['finished'] / total:.0f}%" if total else DASH
        eta = j.get("eta_s")
        t.add_row(
            j["job_id"],
            j["state"],
            _num(j["done"]),
            _num(j["failed"]),
            _num(total),
            pct,
            _num(j.get("rate_per_s"), "{:.1f}"),
            DASH if eta is None else f"{eta:.0f}s",
        )
    return t


def frame(view: dict[str, Any]) -> Group:
    return Group(stage_table(view), jobs_table(view))


def _fetch(client: httpx.Client) -> dict[str, Any]:
    view: dict[str, Any] = _check(client.get("/v1/pipeline"))
    return view


def run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # Piped or captured: wide enough that no row wraps (scripts parse the rows).
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        with httpx.Client(base_url=args.gateway, headers=headers, timeout=10.0) as client:
            if args.once:
                console.print(frame(_fetch(client)))
                return 0
            return _live(client, console, args.interval)
    except (ApiError, httpx.HTTPError) as exc:
        console.print(f"tagpipe status: {args.gateway}: {exc}", markup=False, highlight=False)
        return 1


def _live(client: httpx.Client, console: Console, interval: float) -> int:
    wake = threading.Event()  # never set: a sleep that Ctrl-C interrupts
    with Live(frame(_fetch(client)), console=console, auto_refresh=False) as live:
        try:
            while not wake.wait(interval):
                live.update(frame(_fetch(client)), refresh=True)
        except KeyboardInterrupt:
            pass
    return 0
