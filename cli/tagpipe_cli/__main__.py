"""`tagpipe`: run the stack locally, tag images, submit and follow bulk jobs.

Each subcommand module exposes `add_parser(subparsers)`, which registers its
parser with `func=run(args) -> int`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tagpipe_cli import client, plan, simulate, status, up

# In help order.
SUBCOMMANDS = (up, status, client, plan, simulate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tagpipe", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        raise SystemExit(2)
    try:
        code = args.func(args)
    except BrokenPipeError:
        # `tagpipe job results ID | head`: the reader left, which is not an error.
        # Point stdout at devnull so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    raise SystemExit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
