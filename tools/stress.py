"""Run a command with one busy-loop process per core alongside: a machine as
busy as a shared CI runner. `make test-stress` runs `make test` under it.

    python tools/stress.py [--busy N] [--repeat K] -- COMMAND ...

The busy loops are stopped whatever happens (the command failing, Ctrl-C,
SIGTERM), and the exit status is the command's: the first failing run's when
repeating, which also stops the repeats.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from types import FrameType


def _spin() -> None:
    # Full priority: they compete for the cores as another build on the runner would.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when they stop
    while True:
        pass


def _stop(procs: list[multiprocessing.Process]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5)


def _on_term(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally that stops the loops


def run(command: list[str], busy: int, repeat: int) -> int:
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
    signal.signal(signal.SIGTERM, _on_term)
    for p in procs:
        p.start()
    try:
        for i in range(1, repeat + 1):
            t0 = time.monotonic()
            rc = subprocess.call(command)
            took = time.monotonic() - t0
            print(f"stress: run {i}/{repeat} exit {rc} in {took:.0f} s ({busy} busy loops)")
            if rc != 0:
                return rc
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        _stop(procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy", type=int, default=len(os.sched_getaffinity(0)), help="(nproc)")
    ap.add_argument("--repeat", type=int, default=1, help="run the command this many times")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given")
    sys.exit(run(command, args.busy, args.repeat))


if __name__ == "__main__":
    main()
