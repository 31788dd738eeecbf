"""Fault injection on the real local stack (tagpipe_cli.stack): NATS, Redis, gateway,
downloaders and inference as separate processes, the real ONNX model, images from
a local HTTP server.

Heavy for a 2-core machine, so these run only under `make test-faults`
(TAGPIPE_FAULTS=1); `make test` skips them. Each test records the items it
submitted and the results it found into bench/results/faults.json.

Stream timings are shortened (ack_wait a few seconds) so an item held by a killed
worker is redelivered within the test, not after the production 30-60 s.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tagpipe_cli.stack import Stack

from bench.imageserver import ImageServer
from tests.faults.kit import (
    MODEL_DIR,
    RESULTS_FILE,
    Accounting,
    fault_config,
)
from tests.tools import BackgroundImageServer

ENABLED = os.environ.get("TAGPIPE_FAULTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: only touch the ones under tests/faults.
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="fault injection is heavy: run `make test-faults`")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def images() -> Iterator[ImageServer]:
    with BackgroundImageServer() as srv:
        yield srv


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    if not (MODEL_DIR / "model.onnx").exists():
        pytest.fail("no model: run `make model`", pytrace=False)
    started: list[Stack] = []

    def _make(**over: Any) -> Stack:
        stack = Stack(fault_config(tmp_path / f"stack{len(started)}", **over)).start()
        started.append(stack)
        return stack

    yield _make
    for stack in started:
        stack.stop(grace_s=10)


_records: dict[str, dict[str, Any]] = {}


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    def _record(acc: Accounting, **extra: Any) -> None:
        _records[request.node.name] = {
            "items_submitted": acc.submitted,
            "items_resulted": acc.resulted,
            "job_result_stream_len": acc.stream_len,
            "result_keys": acc.result_keys,
            "done": acc.status["done"],
            "failed": acc.status["failed"],
            "cancelled": acc.status["cancelled"],
            "error_codes": acc.codes,
            **extra,
        }

    return _record


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _records:
        return
    old: dict[str, Any] = {}
    if RESULTS_FILE.exists():
        old = json.loads(RESULTS_FILE.read_text()).get("tests", {})
    doc = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "items submitted vs items with exactly one result, per fault test",
        "tests": {**old, **_records},
    }
    RESULTS_FILE.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
