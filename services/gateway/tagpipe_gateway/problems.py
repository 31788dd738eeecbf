"""RFC 9457 problem details: the one place exceptions become HTTP errors.

Every error response is `application/problem+json` with a stable `code`
(also the last segment of `type`), so clients match on the code, never on the
human-readable title or detail.
"""

from __future__ import annotations

import logging
import uuid
from enum import StrEnum
from typing import Any, NoReturn

import nats.errors
import nats.js.errors
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tagpipe_common import telemetry
from tagpipe_common.outage import TRANSIENT_NATS_ERRORS

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://tagpipe.dev/problems/"


class ProblemCode(StrEnum):
    UNAUTHORIZED = "unauthorized"
    VALIDATION_ERROR = "validation_error"
    TOO_MANY_URLS = "too_many_urls"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    BACKLOG_FULL = "backlog_full"
    TIMEOUT = "timeout"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    # Manifest jobs (POST /v1/manifest-jobs), all 422: the manifest does not exist, the
    # gateway's credentials may not read it, or it cannot be read (not gzip, a store
    # error); the output prefix is not writable; an address the SSRF guard refuses.
    SOURCE_NOT_FOUND = "source_not_found"
    SOURCE_DENIED = "source_denied"
    SOURCE_UNREADABLE = "source_unreadable"
    OUTPUT_NOT_WRITABLE = "output_not_writable"
    BLOCKED_ADDRESS = "blocked_address"
    REDIS_UNAVAILABLE = "redis_unavailable"
    NATS_UNAVAILABLE = "nats_unavailable"
    NOT_READY = "not_ready"
    INTERNAL = "internal"


class Problem(BaseModel):
    """The body of every error response."""

    type: str = Field(examples=[TYPE_BASE + "validation_error"])
    title: str
    status: int
    code: ProblemCode
    detail: str | None = None
    instance: str | None = None
    request_id: str | None = Field(
        default=None,
        description="This request's id (also the `X-Request-Id` header and in the gateway's "
        "log lines): quote it when reporting a problem",
    )
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Per-field validation errors: field (dotted path) and message"
    )
    checks: dict[str, str] | None = Field(
        default=None, description="Readiness: each dependency and `ok` or why it failed"
    )


class ProblemError(Exception):
    """Raise this anywhere in a route; the handler renders it."""

    def __init__(
        self,
        status: int,
        code: ProblemCode,
        title: str,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    status: int,
    code: ProblemCode,
    title: str,
    detail: str | None = None,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
    **extra: Any,
) -> JSONResponse:
    body = Problem(
        type=TYPE_BASE + code.value,
        title=title,
        status=status,
        code=code,
        detail=detail,
        instance=instance,
        # Within a request, RequestIdMiddleware has set the id its log lines carry.
        request_id=request_id or telemetry.request_id_var.get(),
        **extra,
    ).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


class RequestIdMiddleware:
    """Gives every request an id, in `request.state`, the log lines and `X-Request-Id`.

    Always made here, never taken from the caller: a real-time request's id also
    names its results, so a chosen one could collide with another caller's.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        token = telemetry.request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            telemetry.request_id_var.reset(token)


def request_id_of(request: Request) -> str:
    """The id RequestIdMiddleware gave this request (a fresh one outside it)."""
    request_id = getattr(request.state, "request_id", None)
    return request_id if isinstance(request_id, str) else uuid.uuid4().hex


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """`("body", "urls", 3)` -> `body.urls[3]`: the field a client has to fix."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_STATUS_CODES = {
    401: ProblemCode.UNAUTHORIZED,
    404: ProblemCode.NOT_FOUND,
    405: ProblemCode.METHOD_NOT_ALLOWED,
    409: ProblemCode.CONFLICT,
    413: ProblemCode.PAYLOAD_TOO_LARGE,
    415: ProblemCode.UNSUPPORTED_MEDIA_TYPE,
    422: ProblemCode.VALIDATION_ERROR,
    429: ProblemCode.BACKLOG_FULL,
}

# A broker away for now is a 503 with Retry-After, never a 500.
_NATS_DOWN = (
    *(e for e in TRANSIENT_NATS_ERRORS if issubclass(e, nats.errors.Error)),
    nats.js.errors.NoStreamResponseError,
)


def field_error(field: tuple[str | int, ...], message: str, kind: str = "value_error") -> NoReturn:
    """A 422 naming one field, in the same shape as FastAPI's own validation errors."""
    raise RequestValidationError([{"loc": field, "msg": message, "type": kind}])


def install_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProblemError)
        extra = {"request_id": request_id_of(request), **exc.extra}
        return problem_response(
            exc.status,
            exc.code,
            exc.title,
            exc.detail,
            instance=request.url.path,
            headers=exc.headers,
            **extra,
        )

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{"field": field_path(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        fields = ", ".join(e["field"] for e in errors)
        return problem_response(
            422,
            ProblemCode.VALIDATION_ERROR,
            "Request validation failed",
            f"invalid field(s): {fields}",
            instance=request.url.path,
            request_id=request_id_of(request),
            errors=errors,
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, ProblemCode.INTERNAL)
        return problem_response(
            exc.status_code,
            code,
            str(exc.detail),
            instance=request.url.path,
            request_id=request_id_of(request),
            headers=dict(exc.headers or {}),
        )

    async def on_redis(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        return problem_response(
            503,
            ProblemCode.REDIS_UNAVAILABLE,
            "Result store unavailable",
            "Redis cannot be reached; retry later",
            instance=request.url.path,
            request_id=request_id_of(request),
            headers={"Retry-After": "2"},
        )

    async def on_nats(request: Request, exc: Exception) -> JSONResponse:
        log.warning("nats unavailable: %s", exc)
        return problem_response(
            503,
            ProblemCode.NATS_UNAVAILABLE,
            "Work queue unavailable",
            "NATS JetStream cannot be reached; retry later",
            instance=request.url.path,
            request_id=request_id_of(request),
            headers={"Retry-After": "2"},
        )

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        # Handled outside RequestIdMiddleware: the log line names the id itself.
        request_id = request_id_of(request)
        fields = {"request_id": request_id}
        log.exception("unhandled error on %s", request.url.path, extra={"fields": fields})
        return problem_response(
            500,
            ProblemCode.INTERNAL,
            "Internal error",
            instance=request.url.path,
            request_id=request_id,
        )

    app.add_middleware(RequestIdMiddleware)
    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(redis.exceptions.ConnectionError, on_redis)
    app.add_exception_handler(redis.exceptions.TimeoutError, on_redis)
    app.add_exception_handler(redis.exceptions.ReadOnlyError, on_redis)  # a failover
    for exc_type in _NATS_DOWN:
        app.add_exception_handler(exc_type, on_nats)
    app.add_exception_handler(Exception, on_crash)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the problem+json errors a route returns."""
    return {
        s: {
            "model": Problem,  # registers the schema in components
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
            "description": "Problem (RFC 9457)",
        }
        for s in statuses
    }
