"""One ASGI middleware for what every HTTP request gets.

- a request id: the client's ``X-Request-ID`` when it is sane, else a new
  one; echoed back and bound into every log line of the request;
- a time limit (``FORGELINE_REQUEST_TIMEOUT_S``) on reaching the response's
  start; once a response (a stream, a download) has started, it may run on;
- security headers: nosniff, frame denial, referrer policy, and HSTS when
  the request came over TLS;
- one access log line and the HTTP metrics, labelled by route template.

It is plain ASGI, not ``BaseHTTPMiddleware``, so streamed responses pass
through untouched and unbuffered. A body declared over ``FORGELINE_MAX_BODY_BYTES``
is refused before reading, and a streamed one as soon as it passes the
cap: 413 in the error envelope, never the whole body in memory.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import structlog
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forgeline import metrics
from forgeline.api.errors import error_response

logger = structlog.get_logger("forgeline.access")

REQUEST_ID_HEADER = b"x-request-id"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")


class BodyTooLarge(Exception):
    """The request body passed the cap while being read."""


class HttpMiddleware:
    """Request id, time limit, security headers, access log and metrics."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, request_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = headers.get(REQUEST_ID_HEADER, b"").decode("latin-1")
        if not SANE_REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        state: dict[str, Any] = {"status": 500, "started": False, "too_large": False}
        secure = scope.get("scheme") == "https" or headers.get(b"x-forwarded-proto") == b"https"
        too_large = f"the request body is over {self.max_body_bytes} bytes"

        async def send_decorated(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                state["status"] = message["status"]
                extra = [(b"x-request-id", request_id.encode()), *SECURITY_HEADERS]
                if secure:
                    extra.append(HSTS)
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        async def send_wrapper(message: Message) -> None:
            if state["too_large"]:
                # The app met the cap while reading and answers with its own
                # error (FastAPI says 400): answer 413 instead, once.
                if message["type"] == "http.response.start" and not state["started"]:
                    await self._error(scope, send_decorated, 413, "payload_too_large", too_large)
                return
            await send_decorated(message)

        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    state["too_large"] = True
                    raise BodyTooLarge
            return message

        try:
            if _declared_length(headers) > self.max_body_bytes:
                await self._error(scope, send_decorated, 413, "payload_too_large", too_large)
                return
            await self._call_with_deadline(scope, capped_receive, send_wrapper)
        except BodyTooLarge:
            if state["started"]:
                raise
            await self._error(scope, send_decorated, 413, "payload_too_large", too_large)
        except TimeoutError:
            if state["started"]:
                raise
            message = f"the request took over {self.request_timeout_s:g} s"
            await self._error(scope, send_decorated, 504, "request_timeout", message)
        finally:
            self._record(scope, state["status"], time.perf_counter() - started)
            structlog.contextvars.unbind_contextvars("request_id")

    async def _call_with_deadline(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with asyncio.timeout(self.request_timeout_s) as deadline:

            async def send_started(message: Message) -> None:
                if message["type"] == "http.response.start":
                    deadline.reschedule(None)  # a started response may stream on
                await send(message)

            await self.app(scope, receive, send_started)

    @staticmethod
    async def _error(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
        response = error_response(status, code, message, headers={"Connection": "close"})
        await response(scope, _no_body, send)

    def _record(self, scope: Scope, status: int, elapsed_s: float) -> None:
        route = _route_template(scope)
        method = scope["method"]
        metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
        metrics.HTTP_DURATION.labels(method, route).observe(elapsed_s)
        logger.info(
            "request",
            action="http_request",
            method=method,
            route=route,
            status=status,
            duration_ms=round(elapsed_s * 1000, 1),
        )


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _declared_length(headers: dict[bytes, bytes]) -> int:
    try:
        return int(headers.get(b"content-length", b"0") or 0)
    except ValueError:
        return 0


def _route_template(scope: Scope) -> str:
    """The matched route's template; paths no route matched share one label."""
    path = getattr(scope.get("route"), "path", None)
    return str(path) if isinstance(path, str) else "(unmatched)"


class JsonGZipMiddleware:
    """gzip for JSON answers; never for event streams or artifact downloads.

    Streams must reach the client event by event, and downloads keep their
    exact length and bytes; everything else the API answers is JSON.
    """

    def __init__(self, app: ASGIApp, *, minimum_size: int = 1024) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=minimum_size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path.endswith("/events") or "/artifacts/" in path:
            await self.app(scope, receive, send)
        else:
            await self.gzip(scope, receive, send)
