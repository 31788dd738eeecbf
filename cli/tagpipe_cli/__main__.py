"""`tagpipe`: run the stack locally, tag images, submit and follow bulk jobs.

Each subcommand module exposes `add_parser(subparsers)`, which registers its
parser with `func=run(args) -> int`. Optional modules (the planner and the
simulator) are imported only if present, so the CLI works without them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules with `add_parser`, in help order; a missing optional one is skipped.
SUBCOMMANDS = ("up", "client", "plan", "simulate")
OPTIONAL = {"plan", "simulate"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tagpipe", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"tagpipe_cli.{name}")
        except ImportError:
            if name in OPTIONAL:
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        raise SystemExit(2)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main(sys.argv[1:])
