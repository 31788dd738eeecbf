"""Helpers shared by the e2e tests (a unique module name: tests/ has a conftest too)."""

from __future__ import annotations

import functools

from tests.tools import eventually as _eventually

# A real API server: poll it twice a second, not ten times.
eventually = functools.partial(_eventually, every=0.5)
