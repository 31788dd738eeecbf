"""`tagpipe status` draws what GET /v1/pipeline returns and redraws it in place."""

from __future__ import annotations

import io
from typing import Any

import httpx
from rich.console import Console
from tagpipe_cli import status

VIEW: dict[str, Any] = {
    "at": 0.0,
    "stages": [
        {"stage": "download", "backlog": None, "in_flight": None, "images_per_s": 0.0,
         "batch_size": None, "workers": 0},
        {"stage": "infer", "backlog": 12, "in_flight": 3, "images_per_s": 41.26,
         "batch_size": 7.5, "workers": 2},
    ],
    "jobs": [
        {"job_id": "j-1", "state": "running", "done": 30, "failed": 2, "total": 64,
         "finished": 32, "rate_per_s": 4.0, "eta_s": 8.0},
    ],
}  # fmt: skip


def render(view: dict[str, Any]) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(status.frame(view))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_frame_shows_each_stage_and_job() -> None:
    lines = render(VIEW).splitlines()
    (download,) = [ln for ln in lines if "│ download" in ln]
    (infer,) = [ln for ln in lines if "│ infer" in ln]
    (job,) = [ln for ln in lines if "│ j-1" in ln]
    # A stream not there yet and a stage without batches show a dash, not a zero.
    assert [c.strip() for c in download.split("│")[1:-1]] == ["download", "-", "-", "0.0", "-", "0"]
    assert [c.strip() for c in infer.split("│")[1:-1]] == ["infer", "12", "3", "41.3", "7.5", "2"]
    cells = [c.strip() for c in job.split("│")[1:-1]]
    assert cells == ["j-1", "running", "30", "2", "64", "50%", "4.0", "8s"]


def test_live_redraws_in_place_until_ctrl_c() -> None:
    calls = 0

    def gateway(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        assert request.url.path == "/v1/pipeline"
        if calls == 4:
            raise KeyboardInterrupt  # the user's Ctrl-C, during a fetch
        return httpx.Response(200, json=VIEW)

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    client = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(gateway))
    assert status._live(client, console, 0.01) == 0
    assert calls == 4
    # Each redraw moves the cursor back up over the previous frame instead of scrolling.
    assert out.getvalue().count("\x1b[1A") >= 2 * len(render(VIEW).splitlines())
