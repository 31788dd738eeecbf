"""Request dependencies, as `Annotated` aliases the routes declare."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tagpipe_gateway.problems import ProblemCode, ProblemError
from tagpipe_gateway.runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


# Both dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency in
# its thread pool, a thread hop per request for a dict read and one sha256.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def require_api_key(
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's principal (a non-secret id of its key), or 401."""
    keys = runtime.api_keys
    if not keys.enabled:
        return "anonymous"
    if credentials is None or not keys.check(credentials.credentials):
        raise ProblemError(
            401,
            ProblemCode.UNAUTHORIZED,
            "Missing or invalid API key",
            "send `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return keys.principal(credentials.credentials)


PrincipalDep = Annotated[str, Depends(require_api_key)]
