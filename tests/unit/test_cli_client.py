"""The CLI's pure parts: argument parsing, request building, rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tagpipe_cli.__main__ import build_parser
from tagpipe_cli.client import (
    ApiError,
    format_table,
    is_over,
    ndjson_lines,
    render_progress,
    tag_requests,
)


def test_parser_has_every_subcommand() -> None:
    parser = build_parser()
    args = parser.parse_args(["up", "--downloaders", "3", "--inference", "2", "--port", "9000"])
    assert (args.downloaders, args.inference, args.port) == (3, 2, 9000)
    args = parser.parse_args(["job", "submit", "urls.txt", "--idempotency-key", "k"])
    assert args.func.__name__ == "wrapper" and args.idempotency_key == "k"
    for cmd in (
        ["job", "status", "j-1"],
        ["job", "results", "j-1", "--cursor", "1-0"],
        ["tag", "x"],
    ):
        assert callable(parser.parse_args(cmd).func)
    assert callable(parser.parse_args(["plan"]).func)  # registered by its own module


def test_urls_go_in_one_request_and_files_are_uploaded(tmp_path: Path) -> None:
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(b"\xff\xd8jpeg")
    reqs = list(tag_requests(["http://a/1.jpg", str(photo), "https://b/2.png"], top_k=3))
    assert reqs[0] == {"json": {"urls": ["http://a/1.jpg", "https://b/2.png"], "top_k": 3}}
    assert reqs[1]["content"] == b"\xff\xd8jpeg"
    assert reqs[1]["headers"] == {"Content-Type": "image/jpeg"}
    assert reqs[1]["source"] == str(photo)
    with pytest.raises(ApiError, match="neither"):
        list(tag_requests(["no-such-file.jpg"], top_k=3))


def test_plain_lines_become_ndjson(tmp_path: Path) -> None:
    src = tmp_path / "urls.txt"
    src.write_text('http://a/1.jpg\n\n# note\n{"url": "http://a/2.jpg", "id": "x"}\n')
    lines = [json.loads(x) for x in ndjson_lines(src)]
    assert lines == [{"url": "http://a/1.jpg"}, {"url": "http://a/2.jpg", "id": "x"}]


def test_table_shows_tags_and_errors() -> None:
    items: list[dict[str, Any]] = [
        {"source": "cat.jpg", "status": "ok", "tags": [{"label": "tabby cat", "score": 0.61234}]},
        {"source": "http://x/404", "status": "error", "code": "http_404", "tags": []},
    ]
    table = format_table(items).splitlines()
    assert table[1].split() == ["cat.jpg", "tabby", "cat", "0.612"]
    assert "error: http_404" in table[2]


def test_progress_bar_and_end_condition() -> None:
    status = {
        "total": 10,
        "finished": 5,
        "done": 4,
        "failed": 1,
        "cancelled": 0,
        "rate_per_s": 2.0,
        "eta_s": 2.5,
        "state": "running",
    }
    line = render_progress(status, width=10)
    assert line.startswith("[#####-----] 5/10 ok 4 failed 1")
    assert "2.0/s" in line and "ETA 2s" in line
    assert not is_over(status)
    assert not is_over({**status, "state": "cancelled"})  # cancelled, items still in flight
    assert is_over({**status, "state": "cancelled", "finished": 10})
