"""Helpers more than one test tier needs: repository paths, the helm binary, an image server.

Imported as `tests.tools` (pytest's pythonpath is the repository root), the same way
the tiers import `bench.imageserver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.imageserver import ImageServer

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "efficientnet-lite0"


def helm_binary() -> str:
    """The helm `make tools` unpacked (.bin/helm), else one on PATH; skips the test if none."""
    local = ROOT / ".bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("helm")
    if found is None:
        pytest.skip("helm not found: run `make tools` (part of `make setup`) to unpack it")
    return found


class BackgroundImageServer:
    """bench.imageserver's ImageServer on an event loop of its own thread (for sync tests)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = ImageServer(host="127.0.0.1")

    def __enter__(self) -> ImageServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.__aenter__(), self.loop).result(10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.__aexit__(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def eventually(check: Callable[[], Any], within: float = 60.0, every: float = 0.1) -> Any:
    """Poll `check` (sync, or returning an awaitable) until it returns something truthy.

    Fails with the last value. A coroutine `check()` returns is awaited, never taken
    for a truthy answer.
    """
    loop = asyncio.get_running_loop()
    deadline, value = loop.time() + within, None
    while loop.time() < deadline:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met in {within}s; last value {value!r}")


@contextlib.contextmanager
def frozen(proc: subprocess.Popen[Any] | None) -> Iterator[None]:
    """SIGSTOP a live server process (a frozen VM: no TCP reset), and SIGCONT it on the
    way out, whatever happens in between."""
    assert proc is not None and proc.poll() is None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)
