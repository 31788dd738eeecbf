"""Manifest jobs: a job whose item list is an object in storage, not a request body.

A separate operation from `POST /v1/jobs` because there a JSON body already means
an array of items, and generated clients cannot send array-or-object to one
operation. Everything that can be checked is checked before the job exists: the
manifest is readable, the output prefix is writable, the notify_url passes the SSRF
guard. The manifest itself is read in the background (manifest.py).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from tagpipe_common import keys as K
from tagpipe_common import objectstore
from tagpipe_common.errors import ErrorCode, PermanentError, RetryableError
from tagpipe_common.messages import TaskOptions

from tagpipe_gateway.deps import PrincipalDep, RuntimeDep
from tagpipe_gateway.manifest import vet_https
from tagpipe_gateway.manifest_lines import GZIP_MAGIC
from tagpipe_gateway.problems import ProblemCode, ProblemError, field_error, problem_responses
from tagpipe_gateway.routes.jobs import _created, _holding, claim_job
from tagpipe_gateway.runtime import Runtime
from tagpipe_gateway.schemas import JobCreated, ManifestJobRequest
from tagpipe_gateway.webhook import vet_notify_url

router = APIRouter(prefix="/v1/manifest-jobs", tags=["bulk"])

_DESCRIPTION = (
    'The items are the lines of `source`: JSONL (`{"url": ..., "id": ...}`, `id` '
    "optional), JSON strings or bare URLs, gzip allowed (by content or a `.gz` name). "
    "`s3://` is read with the gateway's AWS credentials (`AWS_ENDPOINT_URL` and the "
    "standard chain), `https://` as is. Each non-blank line is one item, numbered from "
    "0 (`seq`); a malformed one ends as error `invalid_url` and the job goes on. "
    "Results go to sharded objects under `output` (`shard-000000.jsonl.gz`, ..., then "
    "`_manifest.json`). Answers like `POST /v1/jobs`; `total` is null until the "
    "manifest is read to its end. With an `Idempotency-Key`, a retried submission "
    "returns the same job (200, `reused`)."
)
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": JobCreated, "description": "Idempotent replay"},
    **problem_responses(401, 409, 422, 503),
}
_STORE_CODES = {
    objectstore.MISSING_KIND: ProblemCode.SOURCE_NOT_FOUND,
    objectstore.DENIED_KIND: ProblemCode.SOURCE_DENIED,
    objectstore.FAILED_KIND: ProblemCode.SOURCE_UNREADABLE,
}


def _first_bytes(url: str, dial: str | None) -> bytes:
    chunks = objectstore.read_stream(url, 0, dial, retry=False)  # answer now, not in 30 s
    try:
        return next(chunks, b"")
    finally:
        chunks.close()  # type: ignore[attr-defined]


def _refused(code: ProblemCode, title: str, detail: str) -> ProblemError:
    return ProblemError(422, code, title, detail)


async def check_source(url: str, allow_cidrs: str) -> None:
    """The manifest exists and these credentials read it (its first bytes)."""
    try:
        dial = await vet_https(url, allow_cidrs) if url.startswith("https://") else None
        head = await asyncio.to_thread(_first_bytes, url, dial)
    except objectstore.ObjectError as exc:
        code = _STORE_CODES.get(exc.kind, ProblemCode.SOURCE_UNREADABLE)
        raise _refused(code, "Manifest not readable", str(exc)) from None
    except (PermanentError, RetryableError) as exc:
        code = ProblemCode.BLOCKED_ADDRESS
        if exc.code != ErrorCode.BLOCKED_ADDRESS:
            code = ProblemCode.SOURCE_UNREADABLE
        raise _refused(code, "Manifest host refused", f"source: {exc.message}") from None
    if url.split("?", 1)[0].endswith(".gz") and head and not head.startswith(GZIP_MAGIC):
        raise _refused(ProblemCode.SOURCE_UNREADABLE, "Manifest not readable", f"{url} is not gzip")


async def check_output(prefix: str) -> None:
    try:
        await asyncio.to_thread(objectstore.check_writable, prefix)
    except objectstore.ObjectError as exc:
        raise _refused(ProblemCode.OUTPUT_NOT_WRITABLE, "Output not writable", str(exc)) from None


async def check_notify(rt: Runtime, url: str) -> None:
    """As `POST /v1/jobs` checks it: the SSRF guard the downloader uses
    (tagpipe_common.netguard); the webhook sender checks again at every delivery."""
    try:
        await vet_notify_url(url, rt.jobs.webhooks.allow, rt.settings.webhook_timeout_s)
    except PermanentError as exc:
        field_error(("body", "notify_url"), f"{exc.code}: {exc.message}")


async def _check(body: ManifestJobRequest, rt: Runtime) -> None:
    if body.notify_url is not None:
        await check_notify(rt, body.notify_url)
    await check_source(body.source, rt.settings.allow_cidrs)
    await check_output(body.output_prefix)


@router.post(
    "",
    response_model=JobCreated,
    status_code=202,
    operation_id="submit_manifest_job",
    summary="Submit a job whose items are a manifest in object storage",
    description=_DESCRIPTION,
    responses=_RESPONSES,
)
async def submit_manifest_job(
    body: ManifestJobRequest,
    response: Response,
    rt: RuntimeDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    top_k: Annotated[int, Query(ge=1, le=100)] = 5,
    min_score: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0,
) -> JobCreated:
    claim = await claim_job(rt, principal, idempotency_key, response, "being checked")
    if isinstance(claim, JobCreated):
        return claim
    job_id, idem = claim.job_id, claim.key
    async with _holding(rt, claim):  # as long as the checks take (a slow store)
        await _check(body, rt)
    fields: dict[str, str | int] = {
        K.JOB_KIND: K.JOB_KIND_MANIFEST,
        K.JOB_SOURCE: body.source,
        K.JOB_OUTPUT: body.output_prefix,
        K.JOB_SHARD_SIZE: rt.settings.shard_size,
    }
    options = TaskOptions(top_k=top_k, min_score=min_score)
    await rt.jobs.create(
        job_id, None, options, principal, body.notify_url, fields, idempotency=idem
    )
    await rt.jobs.submit(job_id)
    await rt.store.durability.confirm(rt.redis)  # a 202 survives the primary's loss
    status = await rt.jobs.status(job_id)
    assert status is not None
    return _created(status, reused=False)
