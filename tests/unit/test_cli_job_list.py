"""`tagpipe job list`: the requests it makes (pages, state filter) and its table."""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx
import pytest
from tagpipe_cli import client
from tagpipe_cli.__main__ import build_parser


def job(n: int, **kw: Any) -> dict[str, Any]:
    base = {"job_id": f"j-{n}", "state": "running", "total": 10, "done": n, "failed": 0}
    return {**base, "cancelled": 0, "created_at": 1764072000.0 + n, "notify": None, **kw}


def run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """Run `tagpipe job list ARGV` against a stub gateway holding five jobs, 2 a page."""
    jobs = [job(n) for n in range(5, 0, -1)]
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        start = int(request.url.params.get("cursor", 0))
        end = start + int(request.url.params["limit"])
        more = str(end) if end < len(jobs) else None
        return httpx.Response(200, json={"jobs": jobs[start:end], "next_cursor": more})

    def stub(args: argparse.Namespace) -> httpx.Client:
        return httpx.Client(base_url="http://gw", transport=httpx.MockTransport(answer))

    monkeypatch.setattr(client, "_client", stub)
    args = build_parser().parse_args(["job", "list", *argv])
    assert args.func(args) == 0
    return seen


def test_list_asks_one_page_and_filters_by_state(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (request,) = run(["--limit", "2", "--state", "cancelled"], monkeypatch)
    assert request.url.path == "/v1/jobs"
    assert dict(request.url.params) == {"limit": "2", "state": "cancelled"}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "JOB", "STATE", "DONE/TOTAL", "FAILED", "CANCELLED", "CREATED", "(UTC)", "WEBHOOK"
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["j-5", "j-4"]


def test_list_all_follows_the_cursor_to_the_end(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = run(["--all", "--limit", "2", "--json"], monkeypatch)
    assert [r.url.params.get("cursor") for r in seen] == [None, "2", "4"]
    out = [json.loads(line)["job_id"] for line in capsys.readouterr().out.splitlines()]
    assert out == ["j-5", "j-4", "j-3", "j-2", "j-1"]


def test_the_table_shows_unknown_totals_and_the_webhook_state() -> None:
    table = client.format_jobs(
        [job(1, total=None, state="submitting", notify={"state": "pending"})]
    ).splitlines()
    assert table[1].split() == [
        "j-1",
        "submitting",
        "1/?",
        "0",
        "0",
        "2025-11-25",
        "12:00:01",
        "pending",
    ]
