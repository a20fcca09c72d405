"""Dependencies shared by the routes, as ``Annotated`` shortcuts."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response, WebSocket
from starlette.datastructures import Headers

from forgeline.auth import ApiKey
from forgeline.errors import ForbiddenError, RateLimitedError, UnauthorizedError
from forgeline.jobs.service import JobService
from forgeline.ratelimit import client_ip
from forgeline.runtime import Runtime
from forgeline.settings import Settings


def get_runtime(request: Request) -> Runtime:
    """The process's runtime, started by the app's lifespan."""
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_runtime_ws(websocket: WebSocket) -> Runtime:
    """The process's runtime, for WebSocket routes."""
    runtime: Runtime = websocket.app.state.runtime
    return runtime


async def get_jobs(request: Request) -> JobService:
    """The job service."""
    return get_runtime(request).jobs


async def get_settings_dep(request: Request) -> Settings:
    """The settings the app was built with."""
    settings: Settings = request.app.state.settings
    return settings


async def authenticate(request: Request, response: Response) -> ApiKey:
    """The caller's API key, after the per-IP and per-key rate limits.

    401 for a missing, malformed, unknown or revoked key; 429 over a limit.
    """
    key, headers = await check_key(get_runtime(request), request.client, request.headers)
    response.headers.update(headers)
    request.state.api_key = key
    return key


async def authenticate_ws(websocket: WebSocket) -> ApiKey:
    """The same checks for a WebSocket (``Authorization`` header on the upgrade)."""
    key, _ = await check_key(get_runtime_ws(websocket), websocket.client, websocket.headers)
    return key


async def check_key(
    runtime: Runtime, client: tuple[str, int] | None, headers: Headers
) -> tuple[ApiKey, dict[str, str]]:
    """Rate-limit the client's IP, check its key, rate-limit the key."""
    limiter = runtime.limiter
    ip = client_ip(client[0] if client else None, headers.get("x-forwarded-for"), runtime.proxies)
    verdict = await limiter.hit(limiter.per_ip, "ip", ip)
    if not verdict.allowed:
        raise RateLimitedError(
            f"too many requests from {ip}; limit {runtime.settings.rate_limit_per_ip}",
            retry_after_s=verdict.reset_s,
            headers=verdict.headers,
        )
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("an API key is required: send 'Authorization: Bearer <key>'")
    key = await runtime.keys.authenticate(token.strip())
    if key is None:
        raise UnauthorizedError("the API key is not valid (malformed, unknown or revoked)")
    verdict = await limiter.hit(limiter.per_key, "key", key.prefix)
    if not verdict.allowed:
        raise RateLimitedError(
            f"too many requests with key {key.prefix}; limit {runtime.settings.rate_limit_per_key}",
            retry_after_s=verdict.reset_s,
            headers=verdict.headers,
        )
    return key, verdict.headers


async def get_owner(key: Annotated[ApiKey, Depends(authenticate)]) -> str:
    """Who owns what this request makes and may see: the key."""
    return key.owner


async def require_admin(key: Annotated[ApiKey, Depends(authenticate)]) -> ApiKey:
    """The caller's key, which must be an admin key (else 403)."""
    if not key.admin:
        raise ForbiddenError("this route needs an admin key")
    return key


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
KeyDep = Annotated[ApiKey, Depends(authenticate)]
AdminDep = Annotated[ApiKey, Depends(require_admin)]
OwnerDep = Annotated[str, Depends(get_owner)]
