"""The services' event loop: uvloop where it is installed, asyncio's otherwise.

The downloader and inference processes spend a measurable share of their CPU
in the event loop itself (socket reads and writes for NATS and HTTP, waking
for thread-pool results): about 3-4 ms of an image's ~30 ms with asyncio's
loop in the py-spy profiles of `make bench-profile` (docs/benchmarks.md).
uvloop runs the same code on libuv. The service extras install it; without it
(or with TAGPIPE_EVENT_LOOP=asyncio, to rule it out when debugging) the
standard loop runs. The gateway's uvicorn picks uvloop by itself the same way.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default loop."""
    if os.environ.get("TAGPIPE_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
