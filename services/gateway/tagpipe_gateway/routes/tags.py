"""Real-time tagging: `POST /v1/tags` and `GET /v1/results/{request_id}`."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import redis.exceptions
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from tagpipe_common import telemetry
from tagpipe_common.messages import DownloadTask, TagResult, TaskOptions
from tagpipe_common.subjects import Lane

from tagpipe_gateway.deps import PrincipalDep, RuntimeDep
from tagpipe_gateway.early import refused, verdict
from tagpipe_gateway.intake import check_url
from tagpipe_gateway.metrics import BACKPRESSURE, observe_deadlines, observe_item
from tagpipe_gateway.openapi import ref
from tagpipe_gateway.problems import (
    ProblemCode,
    ProblemError,
    field_error,
    problem_responses,
    request_id_of,
)
from tagpipe_gateway.runtime import Runtime
from tagpipe_gateway.schemas import ItemResult, TagRequest, TagResponse, TagUpload

router = APIRouter(prefix="/v1", tags=["real-time"])
_tracer = telemetry.tracer("tagpipe_gateway")

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": ref(TagRequest),
                "examples": {
                    "one": {"value": {"url": "https://images.example.com/cat.jpg"}},
                    "several": {
                        "value": {
                            "urls": [
                                "https://images.example.com/cat.jpg",
                                "https://images.example.com/coffee.png",
                            ],
                            "top_k": 3,
                        }
                    },
                },
            },
            "multipart/form-data": {"schema": ref(TagUpload)},
            # The same raw upload as image/*, for client generators that know no image/*.
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _too_large(limit: int) -> ProblemError:
    return ProblemError(
        413,
        ProblemCode.PAYLOAD_TOO_LARGE,
        "Upload too large",
        f"an upload may be at most {limit} bytes",
    )


async def _read_limited(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def _parse_json(request: Request, rt: Runtime) -> tuple[list[str], TaskOptions]:
    raw = await _read_limited(request, 1024 * 1024)
    try:
        req = TagRequest.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        ) from None
    located = req.located_urls()
    urls = [url for _, url in located]
    if not urls:
        field_error(("body", "url"), "give `url` or a non-empty `urls`", "missing")
    limit = rt.settings.max_urls_per_request
    if len(urls) > limit:
        raise ProblemError(
            422,
            ProblemCode.TOO_MANY_URLS,
            "Too many URLs",
            f"at most {limit} URLs per request; submit a job for more",
            errors=[{"field": "body.urls", "message": f"at most {limit} items"}],
        )
    for loc, url in located:
        if (why := check_url(url, rt.settings.max_url_length)) is not None:
            field_error(loc, why)
    return urls, req.options()


async def _parse_uploads(request: Request, rt: Runtime) -> list[bytes]:
    ctype = request.headers.get("content-type", "")
    limit = rt.settings.max_upload_bytes
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=rt.settings.max_urls_per_request)
        files = [f for f in form.getlist("file") if not isinstance(f, str)]
        if not files:
            field_error(("body", "file"), "a multipart upload needs a `file` part", "missing")
        blobs = []
        for f in files:
            data = await f.read(limit + 1)
            if len(data) > limit:
                raise _too_large(limit)
            blobs.append(data)
        return blobs
    data = await _read_limited(request, limit)
    if not data:
        field_error(("body",), "the upload is empty", "missing")
    return [data]


@router.post(
    "/tags",
    response_model=TagResponse,
    summary="Tag images now",
    description=(
        "Send one URL or several (`application/json`), or upload images "
        "(`multipart/form-data` parts `file`, or one raw `image/*` or "
        "`application/octet-stream` body; `top_k` and `min_score` as query parameters, "
        "a JSON body carries its own). Waits up to the request's deadline (`timeout_ms`, "
        "2 s by default); past it returns 504 with the `request_id` for "
        "`GET /v1/results/{request_id}`."
    ),
    responses=problem_responses(401, 413, 415, 422, 429, 503, 504),
    openapi_extra=_BODY_DOC,
)
async def tag_images(
    request: Request,
    rt: RuntimeDep,
    principal: PrincipalDep,
    top_k: Annotated[int, Query(ge=1, le=100, description="Tags per upload")] = 5,
    min_score: Annotated[
        float, Query(ge=0.0, le=1.0, description="Drop an upload's tags scoring below this")
    ] = 0.0,
    timeout_ms: Annotated[
        int | None,
        Query(
            ge=1,
            description="This request's deadline in ms. Default: the gateway's "
            "`TAGPIPE_REALTIME_DEFAULT_TIMEOUT_S` (2000 ms out of the box); at most "
            "`TAGPIPE_REALTIME_TIMEOUT_S` (30000 ms). Refused at once (429) when the "
            "expected wait is longer; items still queued past it are skipped as "
            "`deadline_exceeded`.",
        ),
    ] = None,
) -> TagResponse:
    deadline_s = _deadline_s(rt, timeout_ms)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    blobs: list[bytes] = []
    if ctype == "application/json":
        urls, options = await _parse_json(request, rt)
    elif (
        ctype == "multipart/form-data"
        or ctype.startswith("image/")
        or ctype == "application/octet-stream"
    ):
        blobs = await _parse_uploads(request, rt)
        urls, options = [], TaskOptions(top_k=top_k, min_score=min_score)
    else:
        raise ProblemError(
            415,
            ProblemCode.UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type",
            "send application/json, multipart/form-data or an image/* body",
        )
    await rt.backlog.current()  # never queue behind a read already under way
    # Real-time items ahead only: bulk work waits on its own lane at every stage, and
    # its queue grows with the fleet (admission.bulk_limit).
    ahead = rt.backlog.realtime
    if ahead > rt.settings.realtime_backlog_limit:
        BACKPRESSURE.labels("realtime_429").inc()
        raise ProblemError(
            429,
            ProblemCode.BACKLOG_FULL,
            "Too many images waiting",
            f"{ahead} real-time images are waiting (limit {rt.settings.realtime_backlog_limit})",
            headers={"Retry-After": "2"},
        )
    _admit(rt, len(urls) + len(blobs), deadline_s)
    return await _run_request(
        rt, principal, request_id_of(request), urls, blobs, options, deadline_s
    )


def _deadline_s(rt: Runtime, timeout_ms: int | None) -> float:
    most = rt.settings.realtime_timeout_s
    if timeout_ms is None:
        return rt.settings.default_deadline_s
    if timeout_ms > most * 1000:
        field_error(("query", "timeout_ms"), f"at most {most * 1000:.0f} ms on this gateway")
    return timeout_ms / 1000.0


def _admit(rt: Runtime, items: int, deadline_s: float) -> None:
    """429 when the real-time queue ahead would not drain within the deadline. The
    caller registers the items (the notifier's count) before it next awaits, so
    requests admitted together each see the ones before them."""
    v = verdict(rt, items, deadline_s)
    if not v.admit:
        raise refused(v, items, deadline_s)


async def _run_request(
    rt: Runtime,
    principal: str,
    request_id: str,
    urls: list[str],
    blobs: list[bytes],
    options: TaskOptions,
    deadline_s: float,
) -> TagResponse:
    # The id of the HTTP request (its X-Request-Id) also names its items and results.
    token = telemetry.request_id_var.set(request_id)  # every log line of this request
    attrs: dict[str, str | int] = {
        "tagpipe.request_id": request_id,
        "tagpipe.items": len(urls) + len(blobs),
    }
    # The span's context rides in each task's traceparent header down the pipeline.
    with _tracer.start_as_current_span("tag_request", attributes=attrs):
        try:
            return await _publish_and_wait(
                rt, principal, request_id, urls, blobs, options, deadline_s
            )
        finally:
            telemetry.request_id_var.reset(token)


def _tasks(
    rt: Runtime,
    request_id: str,
    urls: list[str],
    uploads: int,
    options: TaskOptions,
    deadline: float,
) -> list[DownloadTask]:
    """One real-time task per URL, then one per upload (its bytes wait under a blob key)."""
    ids = [f"{request_id}-{i}" for i in range(len(urls) + uploads)]
    common = {"request_id": request_id, "lane": Lane.REALTIME, "options": options}
    tasks = [
        DownloadTask(item_id=i, url=u, deadline=deadline, **common)
        for i, u in zip(ids, urls, strict=False)
    ]
    for i in ids[len(urls) :]:
        tasks.append(DownloadTask(item_id=i, blob_key=rt.keys.blob(i), deadline=deadline, **common))
    return tasks


async def _publish_and_wait(
    rt: Runtime,
    principal: str,
    request_id: str,
    urls: list[str],
    blobs: list[bytes],
    options: TaskOptions,
    deadline_s: float,
) -> TagResponse:
    tasks = _tasks(rt, request_id, urls, len(blobs), options, time.time() + deadline_s)
    index = [[t.item_id, t.source] for t in tasks]
    # Registered before anything is awaited: admission counts these items from now on,
    # and a result may be written before publish returns.
    waiter = rt.notifier.register(request_id, [t.item_id for t in tasks])
    try:
        await _store_request(rt, request_id, principal, index, tasks[len(urls) :], blobs)
        await rt.publisher.publish_many(tasks)
    except BaseException:
        rt.notifier.unregister(waiter)
        raise
    rt.backlog.note_published(len(tasks))
    results = await rt.notifier.wait(waiter, deadline_s)
    observe_deadlines(Lane.REALTIME.value, results)
    response = _response(request_id, index, results)
    if not response.complete:
        raise ProblemError(
            504,
            ProblemCode.TIMEOUT,
            "Results not ready in time",
            f"fetch them later from /v1/results/{request_id}",
            request_id=request_id,
        )
    for r in results:
        if r is not None:
            observe_item(r)
    return response


async def _store_request(
    rt: Runtime,
    request_id: str,
    principal: str,
    index: list[list[str]],
    uploads: list[DownloadTask],
    blobs: list[bytes],
) -> None:
    """The request's record and its uploads, within one socket timeout: redis-py would
    retry a frozen primary up to 4 times (a timeout each), and this request should
    rather hear 503 and retry than wait that long. Nothing is published before."""
    try:
        async with asyncio.timeout(rt.settings.redis_socket_timeout_s):
            async with rt.redis.pipeline(transaction=False) as pipe:
                record = json.dumps({"owner": principal, "items": index})
                pipe.set(rt.keys.request(request_id), record, ex=rt.settings.result_ttl_s)
                for t, blob in zip(uploads, blobs, strict=True):
                    pipe.set(t.blob_key or "", blob, ex=rt.settings.blob_ttl_s)
                await pipe.execute()
    except TimeoutError:
        raise redis.exceptions.TimeoutError("storing the request took too long") from None


def _response(
    request_id: str, index: list[list[str]], results: list[TagResult | None]
) -> TagResponse:
    items = [
        ItemResult.of(i, item_id, source, r)
        for i, ((item_id, source), r) in enumerate(zip(index, results, strict=True))
    ]
    return TagResponse(
        request_id=request_id, complete=all(r is not None for r in results), items=items
    )


@router.get(
    "/results/{request_id}",
    response_model=TagResponse,
    summary="Results of a real-time request",
    description="For a request that timed out (504): items not finished yet are `pending`.",
    responses=problem_responses(401, 404, 422, 503),
)
async def get_results(request_id: str, rt: RuntimeDep, principal: PrincipalDep) -> TagResponse:
    raw = await rt.redis.get(rt.keys.request(request_id))
    record = json.loads(raw) if raw is not None else None
    # Another caller's request is reported exactly like a missing one.
    if record is None or record["owner"] != principal:
        raise ProblemError(
            404,
            ProblemCode.NOT_FOUND,
            "Unknown request id",
            f"no request {request_id} (or its results expired)",
        )
    index: list[list[str]] = record["items"]
    results = await rt.store.get_many([item_id for item_id, _ in index])
    return _response(request_id, index, results)
