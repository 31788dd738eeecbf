"""`tagpipe tag` and `tagpipe job ...`: a thin client of the gateway's REST API."""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
FINAL = ("completed", "cancelled")


class ApiError(Exception):
    """A problem+json answer, rendered as one line."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gateway", default=os.environ.get("TAGPIPE_GATEWAY_URL", DEFAULT_GATEWAY))
    common.add_argument(
        "--api-key", default=os.environ.get("TAGPIPE_API_KEY"), help="or env TAGPIPE_API_KEY"
    )
    common.add_argument("--timeout", type=float, default=120.0, help="HTTP timeout, seconds")

    p = subparsers.add_parser("tag", parents=[common], help="tag image URLs or local files")
    p.add_argument("sources", nargs="+", metavar="URL|PATH")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_tag)

    job = subparsers.add_parser("job", help="bulk jobs").add_subparsers(dest="job_cmd")
    s = job.add_parser(
        "submit",
        parents=[common],
        help="submit a file of URLs (or NDJSON), or a manifest in storage (--source)",
    )
    s.add_argument(
        "file", type=Path, nargs="?", help="one URL per line, or NDJSON {url, id}; - for stdin"
    )
    s.add_argument("--source", help="instead of FILE: the manifest, s3://bucket/key or https://")
    s.add_argument("--output", help="with --source: the results' prefix, s3://bucket/prefix/")
    s.add_argument("--notify-url", help="POSTed a signed event when the job ends")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--idempotency-key")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    s.set_defaults(func=cmd_submit)
    st = job.add_parser("status", parents=[common], help="a job's progress")
    st.add_argument("job_id")
    st.set_defaults(func=cmd_status)
    r = job.add_parser("results", parents=[common], help="a job's results as NDJSON")
    r.add_argument("job_id")
    r.add_argument("--cursor", help="resume after this cursor")
    r.add_argument("--follow", action="store_true", help="keep printing until the job is over")
    r.set_defaults(func=cmd_results)
    c = job.add_parser("cancel", parents=[common], help="cancel a job")
    c.add_argument("job_id")
    c.set_defaults(func=cmd_cancel)
    ls = job.add_parser("list", parents=[common], help="your jobs, newest first")
    ls.add_argument("--state", choices=["submitting", "running", "completed", "cancelled"])
    ls.add_argument("--limit", type=int, default=20, help="how many jobs (default 20)")
    ls.add_argument("--all", action="store_true", help="every job, page after page")
    ls.add_argument("--json", action="store_true", help="print the jobs as JSON lines")
    ls.set_defaults(func=cmd_list)


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.gateway, headers=headers, timeout=args.timeout)


def _check(r: httpx.Response) -> Any:
    if r.is_success:
        return r.json()
    try:
        p = r.json()
        msg = f"{p.get('code')}: {p.get('title')}" + (
            f" ({p['detail']})" if p.get("detail") else ""
        )
    except ValueError:
        msg = r.text[:200]
    raise ApiError(f"HTTP {r.status_code} {msg}")


def _guarded(fn: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except ApiError as exc:
            print(f"tagpipe: {exc}", file=sys.stderr)
        except httpx.HTTPError as exc:
            print(f"tagpipe: cannot reach {args.gateway}: {exc}", file=sys.stderr)
        return 1

    return wrapper


def tag_requests(sources: list[str], top_k: int) -> Iterator[dict[str, Any]]:
    """httpx request kwargs: one JSON request for the URLs, one upload per local file."""
    urls = [s for s in sources if s.startswith(("http://", "https://"))]
    for i in range(0, len(urls), 32):
        yield {"json": {"urls": urls[i : i + 32], "top_k": top_k}}
    for s in sources:
        if s in urls:
            continue
        path = Path(s)
        if not path.is_file():
            raise ApiError(f"{s}: neither an http(s) URL nor a file")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        yield {
            "content": path.read_bytes(),
            "headers": {"Content-Type": ctype},
            "params": {"top_k": top_k},
            "source": s,
        }


def format_table(items: list[dict[str, Any]]) -> str:
    rows = [("SOURCE", "LABEL", "SCORE")]
    for it in items:
        src = str(it.get("source"))
        if it["status"] != "ok":
            rows.append((src, f"error: {it.get('code')}", ""))
        for n, tag in enumerate(it.get("tags", [])):
            rows.append((src if n == 0 else "", tag["label"], f"{tag['score']:.3f}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c:>{width[2]}}" for a, b, c in rows)


@_guarded
def cmd_tag(args: argparse.Namespace) -> int:
    items: list[dict[str, Any]] = []
    with _client(args) as http:
        for req in tag_requests(args.sources, args.top_k):
            source = req.pop("source", None)
            body = _check(http.post("/v1/tags", **req))
            for it in body["items"]:
                if source is not None:
                    it["source"] = source
                items.append(it)
    print(json.dumps(items, indent=2) if args.json else format_table(items))
    return 0 if all(it["status"] == "ok" for it in items) else 3


def ndjson_lines(path: Path) -> Iterator[bytes]:
    """Stream the file as NDJSON; a bare URL line becomes {"url": ...}."""
    stream = sys.stdin if str(path) == "-" else path.open()
    with stream:
        for raw in stream:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            yield (line if line.startswith("{") else json.dumps({"url": line})).encode() + b"\n"


def render_progress(s: dict[str, Any], width: int = 30) -> str:
    total = s.get("total") or 0
    finished = s["finished"]
    filled = int(width * finished / total) if total else 0
    bar = "#" * filled + "-" * (width - filled)
    rate = f"{s['rate_per_s']:.1f}/s" if s.get("rate_per_s") else "-/s"
    eta = f"ETA {s['eta_s']:.0f}s" if s.get("eta_s") is not None else ""
    return (
        f"[{bar}] {finished}/{total} ok {s['done']} failed {s['failed']} "
        f"cancelled {s['cancelled']}  {rate} {eta} {s['state']}"
    ).rstrip()


def is_over(s: dict[str, Any]) -> bool:
    return s["state"] in FINAL and s["finished"] >= (s.get("total") or 0)


def _submit(http: httpx.Client, args: argparse.Namespace) -> Any:
    """POST /v1/jobs with the file, or POST /v1/manifest-jobs naming a manifest."""
    if (args.file is None) == (args.source is None) or (args.source is None) != (
        args.output is None
    ):
        raise ApiError("give either FILE, or --source and --output (a manifest job)")
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    params = {"top_k": args.top_k}
    if args.source is not None:
        body = {"source": args.source, "output": args.output}
        if args.notify_url:
            body["notify_url"] = args.notify_url
        r = http.post("/v1/manifest-jobs", json=body, headers=headers, params=params)
        return _check(r)
    if args.notify_url:
        params["notify_url"] = args.notify_url
    headers["Content-Type"] = "application/x-ndjson"
    content = ndjson_lines(args.file)
    return _check(http.post("/v1/jobs", content=content, headers=headers, params=params))


@_guarded
def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as http:
        job = _submit(http, args)
        print(job["job_id"], flush=True)
        if args.no_wait:
            return 0
        tty = sys.stderr.isatty()
        while True:
            status = _check(http.get(f"/v1/jobs/{job['job_id']}"))
            line = render_progress(status)
            print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr)
            if is_over(status):
                if tty:
                    print(file=sys.stderr)  # end the \r line
                return 0
            time.sleep(0.5 if tty else 2.0)


@_guarded
def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as http:
        print(json.dumps(_check(http.get(f"/v1/jobs/{args.job_id}")), indent=2))
    return 0


@_guarded
def cmd_results(args: argparse.Namespace) -> int:
    cursor = args.cursor
    while True:  # with --follow, one long-poll after another, each resuming at the cursor
        params: dict[str, str | float] = {"follow": 300.0} if args.follow else {}
        if cursor:
            params["cursor"] = cursor
        with (
            _client(args) as http,
            http.stream("GET", f"/v1/jobs/{args.job_id}/results", params=params, timeout=330) as r,
        ):
            if not r.is_success:
                r.read()
                _check(r)
            for line in r.iter_lines():
                if line:
                    print(line, flush=args.follow)
                    cursor = line[11 : line.index('"', 11)]  # {"cursor":"<id>",...
        if not args.follow or _job_over(args):
            return 0


def _job_over(args: argparse.Namespace) -> bool:
    with _client(args) as http:
        return is_over(_check(http.get(f"/v1/jobs/{args.job_id}")))


@_guarded
def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as http:
        print(json.dumps(_check(http.delete(f"/v1/jobs/{args.job_id}")), indent=2))
    return 0


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    """`tagpipe job list`'s table: one job a row."""
    rows = [("JOB", "STATE", "DONE/TOTAL", "FAILED", "CANCELLED", "CREATED (UTC)", "WEBHOOK")]
    for j in jobs:
        total = "?" if j.get("total") is None else str(j["total"])
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(j["created_at"]))
        hook = (j.get("notify") or {}).get("state", "-")
        row = (j["job_id"], j["state"], f"{j['done']}/{total}", str(j["failed"]))
        rows.append((*row, str(j["cancelled"]), created, hook))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip() for r in rows
    )


@_guarded
def cmd_list(args: argparse.Namespace) -> int:
    jobs: list[dict[str, Any]] = []
    params: dict[str, str | int] = {"limit": min(args.limit, 1000)}
    if args.state:
        params["state"] = args.state
    with _client(args) as http:
        while True:
            page = _check(http.get("/v1/jobs", params=params))
            jobs += page["jobs"]
            if page["next_cursor"] is None or (not args.all and len(jobs) >= args.limit):
                break
            params["cursor"] = page["next_cursor"]
    jobs = jobs if args.all else jobs[: args.limit]
    print("\n".join(json.dumps(j) for j in jobs) if args.json else format_jobs(jobs))
    return 0
