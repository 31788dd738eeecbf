"""Helpers shared by the e2e tests (a unique module name: tests/ has a conftest too)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def eventually(check: Callable[[], Any], within: float = 60.0, every: float = 0.5) -> Any:
    """Poll `check` (sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline, value = loop.time() + within, None
    while loop.time() < deadline:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"not met within {within}s; last value {value!r}")
