"""Bulk jobs: submit, status, results (resumable NDJSON), cancel."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from tagpipe_common.errors import PermanentError
from tagpipe_common.messages import TaskOptions

from tagpipe_gateway.deps import PrincipalDep, RuntimeDep
from tagpipe_gateway.intake import NDJSON_TYPES, Spool, spool_json_array, spool_ndjson
from tagpipe_gateway.joblist import Cursor, list_jobs
from tagpipe_gateway.jobs import FINAL_STATES
from tagpipe_gateway.openapi import ref
from tagpipe_gateway.problems import ProblemCode, ProblemError, field_error, problem_responses
from tagpipe_gateway.runtime import Runtime
from tagpipe_gateway.schemas import (
    JobCreated,
    JobEvent,
    JobItem,
    JobList,
    JobResultLine,
    JobResultsPage,
    JobState,
    JobStatus,
    JobUpload,
)
from tagpipe_gateway.webhook import vet_notify_url

router = APIRouter(prefix="/v1/jobs", tags=["bulk"])
# What the gateway sends, not serves: the OpenAPI document's `webhooks` (app.py).
webhooks = APIRouter(tags=["bulk"])

_CURSOR = re.compile(r"^\d{1,20}-\d{1,20}$")
_NDJSON_EXAMPLE = (
    '{"url": "https://images.example.com/cat.jpg", "id": "sku-1"}\n'
    '{"url": "https://images.example.com/coffee.png", "id": "sku-2"}\n'
)
# Client generators cannot send one operation's body as either a top-level JSON
# array or something else (openapi-python-client's call raises TypeError), so the
# JSON array, which POST /v1/jobs accepts too, is documented as its own operation.
_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}, "example": _NDJSON_EXAMPLE},
            "multipart/form-data": {"schema": ref(JobUpload)},
        },
    }
}
_JSON_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "array", "items": {"anyOf": [{"type": "string"}, ref(JobItem)]}},
                "example": [
                    "https://images.example.com/cat.jpg",
                    {"url": "https://images.example.com/coffee.png", "id": "sku-2"},
                ],
            },
        },
    }
}
_SUBMIT_DOC = (
    "The body is streamed, validated and stored; the job id comes back as soon as it "
    "is read, and items are published in the background. `id` is your item id: a "
    "repeated id is one item. A URL repeated within a job ends as error `duplicate_url` "
    "naming the first item. With an `Idempotency-Key`, a retried submission returns the "
    "same job (200, `reused`) for as long as the job exists; while the first upload of "
    "that key is still being read, a retry gets 409."
)
NotifyQuery = Annotated[
    str | None,
    Query(
        max_length=2048,
        description="An http(s) URL to POST a signed `JobEvent` to when the job ends "
        "(completed or cancelled), at least once; see the `job-ended` webhook. A URL "
        "whose host is a private address is refused",
        examples=["https://hooks.example.com/tagpipe"],
    ),
]
_SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": JobCreated, "description": "Idempotent replay"},
    **problem_responses(401, 409, 413, 415, 422, 503),
}


def _job_id(principal: str, idem_key: str | None) -> str:
    if idem_key is None:
        return "j-" + secrets.token_hex(8)
    # Derived, so a retried submission maps to the same job and the same item ids.
    return "j-" + hashlib.sha256(f"{principal}\0{idem_key}".encode()).hexdigest()[:16]


def _created(status: JobStatus, reused: bool) -> JobCreated:
    base = f"/v1/jobs/{status.job_id}"
    return JobCreated(
        job_id=status.job_id,
        state=status.state,
        total=status.total,
        status_url=base,
        results_url=base + "/results",
        reused=reused,
    )


async def _body_chunks(request: Request) -> AsyncIterator[bytes]:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        # Starlette spools file parts to disk past 1 MiB, so this stays bounded too.
        form = await request.form(max_files=1)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            field_error(("body", "file"), "a `file` part is required", "missing")
        while chunk := await upload.read(1 << 16):
            yield chunk
        return
    async for chunk in request.stream():
        yield chunk


async def _read_items(request: Request, rt: Runtime, job_id: str) -> int:
    """Stream the body into the job's item stream; returns the item count."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    submitter = rt.jobs.submitter
    await submitter.discard(job_id)  # leftovers of an interrupted upload of this job
    spool = Spool(
        lambda start, items: submitter.append(job_id, start, items),
        rt.settings.max_job_items,
        rt.settings.max_url_length,
        batch=rt.settings.bulk_batch_size,
    )
    try:
        if ctype == "application/json":
            await spool_json_array(_body_chunks(request), spool)
        elif ctype in NDJSON_TYPES or ctype == "multipart/form-data":
            await spool_ndjson(_body_chunks(request), spool)
        else:
            raise ProblemError(
                415,
                ProblemCode.UNSUPPORTED_MEDIA_TYPE,
                "Unsupported media type",
                "send application/json (an array) or application/x-ndjson",
            )
        if spool.count == 0:
            raise ProblemError(
                422,
                ProblemCode.VALIDATION_ERROR,
                "Request validation failed",
                "invalid field(s): body",
                errors=[{"field": "body", "message": "the job has no items"}],
            )
    except BaseException:
        await submitter.discard(job_id)
        raise
    return spool.count


@router.post(
    "",
    response_model=JobCreated,
    status_code=202,
    summary="Submit a bulk job",
    description=(
        "NDJSON (one `JobItem` object, JSON string or bare URL per line), as the body or "
        "as a multipart `file`; also a JSON array, as in `submit_job_json`. " + _SUBMIT_DOC
    ),
    responses=_SUBMIT_RESPONSES,
    openapi_extra=_UPLOAD_DOC,
)
@router.post(
    "/json",
    response_model=JobCreated,
    status_code=202,
    operation_id="submit_job_json",
    summary="Submit a bulk job as a JSON array",
    description=(
        "A JSON array of URLs or `JobItem` objects: the same as `POST /v1/jobs` with "
        "`application/json`, for clients that cannot send an array there. " + _SUBMIT_DOC
    ),
    responses=_SUBMIT_RESPONSES,
    openapi_extra=_JSON_DOC,
)
async def submit_job(
    request: Request,
    response: Response,
    rt: RuntimeDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    top_k: Annotated[int, Query(ge=1, le=100)] = 5,
    min_score: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0,
    notify_url: NotifyQuery = None,
) -> JobCreated:
    if notify_url is not None:
        await _vet_notify_url(rt, notify_url)
    claim = await claim_job(rt, principal, idempotency_key, response, "uploading")
    if isinstance(claim, JobCreated):
        return claim
    job_id, idem = claim.job_id, claim.key
    async with _holding(rt, claim):
        total = await _read_items(request, rt, job_id)
    options = TaskOptions(top_k=top_k, min_score=min_score)
    await rt.jobs.create(job_id, total, options, principal, notify_url, idempotency=idem)
    await rt.jobs.submit(job_id)
    await rt.store.durability.confirm(rt.redis)  # a 202 survives the primary's loss
    status = await rt.jobs.status(job_id)
    assert status is not None
    return _created(status, reused=False)


@dataclass(frozen=True)
class Claim:
    """A new job's id, and its Idempotency-Key's Redis key (if any) locked for it."""

    job_id: str
    key: str | None
    lock_ms: int


async def claim_job(
    rt: Runtime, principal: str, idempotency_key: str | None, response: Response, busy: str
) -> Claim | JobCreated:
    """The id for a new job, its Idempotency-Key locked for it; or, for a retry of a key
    that made a job, that job (200, `reused`). 409 while the key's first request is
    still `busy` (uploading, being checked)."""
    job_id = _job_id(principal, idempotency_key)
    idem = rt.keys.idempotency(f"{principal}:{idempotency_key}") if idempotency_key else None
    # Held while the request runs (_holding), then for the job's life (JobManager.create).
    lock_ms = int(rt.settings.idempotency_upload_lock_s * 1000)
    if idem is not None and not await rt.redis.set(idem, job_id, nx=True, px=lock_ms):
        status = await rt.jobs.status(job_id, principal)
        if status is None:
            raise ProblemError(
                409,
                ProblemCode.CONFLICT,
                "Submission in progress",
                f"a submission with this Idempotency-Key is still {busy}",
            )
        response.status_code = 200
        return _created(status, reused=True)
    return Claim(job_id, idem, lock_ms)


@contextlib.asynccontextmanager
async def _holding(rt: Runtime, claim: Claim) -> AsyncIterator[None]:
    """Keep a claim's Idempotency-Key locked while a request of any length runs (a
    gateway that dies mid-way stops renewing, and the key frees `lock_ms` later);
    free it at once if the request fails."""
    idem, lock_ms = claim.key, claim.lock_ms

    async def renew() -> None:
        assert idem is not None
        while True:
            await asyncio.sleep(lock_ms / 3000)
            with contextlib.suppress(Exception):  # Redis away: the upload fails anyway
                await rt.redis.pexpire(idem, lock_ms)

    task = asyncio.create_task(renew()) if idem is not None else None
    try:
        yield
    except BaseException:
        if idem is not None:
            await rt.redis.delete(idem)
        raise
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _vet_notify_url(rt: Runtime, url: str) -> None:
    try:
        await vet_notify_url(url, rt.jobs.webhooks.allow, rt.settings.webhook_timeout_s)
    except PermanentError as exc:
        field_error(("query", "notify_url"), f"{exc.code}: {exc.message}")


async def _status_or_404(rt: Runtime, job_id: str, principal: str) -> JobStatus:
    # Another caller's job is reported exactly like a missing one.
    status = await rt.jobs.status(job_id, principal)
    if status is None:
        raise ProblemError(404, ProblemCode.NOT_FOUND, "Unknown job", f"no job {job_id}")
    return status


@router.get(
    "",
    response_model=JobList,
    summary="List your jobs",
    description=(
        "Your jobs (those of your API key), newest first, `limit` at a time; pass "
        "`next_cursor` as `cursor` for the next page until it is null. `state` keeps "
        "only the jobs in that state. Jobs are listed until they expire."
    ),
    responses=problem_responses(401, 422, 503),
)
async def list_my_jobs(
    rt: RuntimeDep,
    principal: PrincipalDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> JobList:
    after = None
    if cursor is not None:
        after = Cursor.parse(cursor)
        if after is None:
            field_error(("query", "cursor"), "not a cursor from this API")
    return await list_jobs(rt.redis, rt.keys, principal, state, limit, after)


@router.get(
    "/{job_id}",
    response_model=JobStatus,
    summary="Job progress",
    responses=problem_responses(401, 404, 422, 503),
)
async def get_job(job_id: str, rt: RuntimeDep, principal: PrincipalDep) -> JobStatus:
    return await _status_or_404(rt, job_id, principal)


CursorQuery = Annotated[
    str | None, Query(description="Resume after this cursor", examples=["1764072000000-0"])
]


def _check_cursor(cursor: str | None) -> None:
    if cursor is not None and not _CURSOR.match(cursor):
        field_error(("query", "cursor"), "not a cursor from this API")


@router.get(
    "/{job_id}/results",
    response_class=StreamingResponse,
    summary="Job results as NDJSON",
    description=(
        "One `JobResultLine` per line, each with a `cursor`. Pass the last cursor you "
        "read as `cursor` to resume after it. Results appear as items finish. Clients "
        "that cannot read NDJSON page through `get_job_results_page` instead."
    ),
    responses={
        200: {
            "content": {"application/x-ndjson": {"schema": ref(JobResultLine)}},
            "description": "NDJSON: one `JobResultLine` per line",
        },
        **problem_responses(401, 404, 422, 503),
    },
)
async def get_job_results(
    job_id: str,
    request: Request,
    rt: RuntimeDep,
    principal: PrincipalDep,
    cursor: CursorQuery = None,
    limit: Annotated[int | None, Query(ge=1, le=10_000_000)] = None,
    follow: Annotated[
        float,
        Query(
            ge=0,
            le=3600,
            description="Keep streaming new results for up to this many seconds, "
            "ending early once the job is over",
        ),
    ] = 0.0,
) -> StreamingResponse:
    _check_cursor(cursor)
    status = await _status_or_404(rt, job_id, principal)
    return StreamingResponse(
        # On SIGTERM a follow ends at a line boundary; the client resumes elsewhere.
        rt.jobs.iter_results(job_id, cursor, limit, follow, stop=request.app.state.drain.event),
        media_type="application/x-ndjson",
        headers={"Tagpipe-Job-State": status.state},
    )


@router.get(
    "/{job_id}/results/page",
    response_model=JobResultsPage,
    summary="Job results, a JSON page at a time",
    description=(
        "The results `GET /v1/jobs/{job_id}/results` streams, as one JSON document of at "
        "most `limit` lines; pass `next_cursor` as `cursor` for the next page until `over`."
    ),
    responses=problem_responses(401, 404, 422, 503),
)
async def get_job_results_page(
    job_id: str,
    rt: RuntimeDep,
    principal: PrincipalDep,
    cursor: CursorQuery = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> JobResultsPage:
    _check_cursor(cursor)
    # State first: results are written with their counters, so a job read as over
    # here has all of its results in the stream already.
    status = await _status_or_404(rt, job_id, principal)
    lines = [
        JobResultLine.model_validate_json(line)
        async for line in rt.jobs.iter_results(job_id, cursor, limit)
    ]
    next_cursor = lines[-1].cursor if lines else cursor
    ended = status.state in FINAL_STATES and status.finished >= (status.total or 0)
    return JobResultsPage(
        results=lines,
        next_cursor=next_cursor,
        state=status.state,
        over=ended and len(lines) < limit,
    )


@router.delete(
    "/{job_id}",
    response_model=JobStatus,
    summary="Cancel a job",
    description=(
        "The job ends at once (`cancelled`, with `finished_at`). Items not tagged yet are "
        "dropped without a result and counted in `cancelled`; finished ones keep their "
        "results, and items already past download may still finish (moving from "
        "`cancelled` to `done` or `failed`). Cancelling an ended job changes nothing."
    ),
    responses=problem_responses(401, 404, 422, 503),
)
async def cancel_job(job_id: str, rt: RuntimeDep, principal: PrincipalDep) -> JobStatus:
    status = await rt.jobs.cancel(job_id, principal)
    if status is None:
        raise ProblemError(404, ProblemCode.NOT_FOUND, "Unknown job", f"no job {job_id}")
    return status


@webhooks.post(
    "job-ended",
    operation_id="job_ended",
    summary="A job ended (sent to its notify_url)",
    description=(
        "POSTed once a job with a `notify_url` is `completed` or `cancelled`, at least "
        "once: failures (no answer in TAGPIPE_WEBHOOK_TIMEOUT_S, or any status but 2xx) "
        "are retried with exponential backoff and jitter for TAGPIPE_WEBHOOK_GIVE_UP_S "
        "(3 days by default), every retry with the same body and `Tagpipe-Event-Id`; "
        "the job's `notify` field says how it went. Verify `Tagpipe-Signature: "
        "t=<unix>,v1=<hex>`: hex = HMAC-SHA256(secret, `<t>.<raw body>`), compared in "
        "constant time, with `t` within 5 minutes of now."
    ),
    responses={200: {"description": "Any 2xx acknowledges the event; anything else is retried"}},
)
def job_ended(
    event: JobEvent,
    tagpipe_signature: Annotated[str, Header(examples=["t=1764072000,v1=5f2b...e1"])],
    tagpipe_event_id: Annotated[str, Header(description="Dedupe on this")],
    tagpipe_event: Annotated[str, Header(examples=["job.completed"])],
    tagpipe_delivery_attempt: Annotated[int, Header(description="1 on the first try")],
) -> None:
    """Documentation only: the gateway never serves this path."""
