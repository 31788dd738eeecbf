"""`tagpipe job submit --source ... --output ...`: the request the CLI sends."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from tagpipe_cli.__main__ import build_parser
from tagpipe_cli.client import ApiError, _submit


def sent(argv: list[str]) -> httpx.Request:
    """The one request `tagpipe job submit ARGV` makes (answered 202 by a stub)."""
    args = build_parser().parse_args(["job", "submit", *argv])
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={"job_id": "j-1"})

    with httpx.Client(base_url="http://gw", transport=httpx.MockTransport(answer)) as http:
        assert _submit(http, args) == {"job_id": "j-1"}
    (request,) = seen
    return request


def test_a_manifest_job_names_its_source_and_output() -> None:
    argv = ["--source", "s3://b/m.jsonl.gz", "--output", "s3://b/out/", "--top-k", "3",
            "--notify-url", "https://hooks.example.com/t", "--idempotency-key", "k"]  # fmt: skip
    request = sent(argv)
    assert (request.method, request.url.path) == ("POST", "/v1/manifest-jobs")
    assert request.url.params["top_k"] == "3" and request.headers["Idempotency-Key"] == "k"
    assert json.loads(request.content) == {
        "source": "s3://b/m.jsonl.gz",
        "output": "s3://b/out/",
        "notify_url": "https://hooks.example.com/t",
    }


def test_a_file_job_still_uploads_ndjson(tmp_path: Path) -> None:
    (tmp_path / "urls.txt").write_text("http://a/1.jpg\n")
    request = sent([str(tmp_path / "urls.txt")])
    assert (request.method, request.url.path) == ("POST", "/v1/jobs")
    assert request.headers["Content-Type"] == "application/x-ndjson"


@pytest.mark.parametrize(
    "argv",
    [[], ["urls.txt", "--source", "s3://b/k", "--output", "s3://b/o/"], ["--source", "s3://b/k"]],
)
def test_either_a_file_or_a_source_and_an_output(argv: list[str]) -> None:
    with pytest.raises(ApiError, match="either FILE"):
        sent(argv)
