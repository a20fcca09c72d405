"""Every error becomes the JSON envelope ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import math
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from procrastinate.exceptions import ConnectorException
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException

from forgeline import errors

logger = structlog.get_logger("forgeline.api")

STATUS_BY_ERROR: list[tuple[type[errors.ForgelineError], int]] = [
    (errors.UnauthorizedError, 401),
    (errors.ForbiddenError, 403),
    (errors.RateLimitedError, 429),
    (errors.NotFoundError, 404),
    (errors.ConflictError, 409),
    (errors.InvalidInputError, 422),
    (errors.BackendUnavailableError, 503),
    (errors.StorageError, 503),
    (errors.DatabaseUnavailableError, 503),
]
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
              415: "unsupported_media_type", 429: "rate_limited"}  # fmt: skip


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A response in the error envelope."""
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _forgeline_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ForgelineError)
    status = next((s for kind, s in STATUS_BY_ERROR if isinstance(exc, kind)), 500)
    if status == 500:
        logger.error("unexpected forgeline error", action="error", code=exc.code)
        return error_response(500, "internal_error", "internal error")
    headers = {"Retry-After": "5"} if status == 503 else None
    if isinstance(exc, errors.UnauthorizedError):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, errors.RateLimitedError):
        headers = {**exc.headers, "Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return error_response(status, exc.code, exc.message, exc.details, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    if any(problem.get("type") == "json_invalid" for problem in problems):
        return error_response(400, "malformed_json", "the request body is not valid JSON")
    details = [
        {"loc": list(p.get("loc", ())), "msg": p.get("msg", ""), "type": p.get("type", "")}
        for p in problems
    ]
    return error_response(422, "invalid_request", "the request is invalid", details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 405:
        # Starlette names the methods of the first route on the path only;
        # a path served by several routes (GET and POST /jobs) allows them all.
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return error_response(exc.status_code, code, str(exc.detail), headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this request's path."""
    routes: list[APIRoute] = getattr(request.app.state, "http_routes", [])
    methods: set[str] = set()
    for route in routes:
        if route.path_regex.fullmatch(request.url.path):
            methods.update(route.methods or ())
    return sorted(methods)


async def _unstorable_input(request: Request, exc: Exception) -> JSONResponse:
    # PostgreSQL refuses some values that pass JSON validation, chiefly NUL
    # characters (\u0000) in text and JSON: the caller's input, not our fault.
    logger.info("input refused by the database", action="data_error", error=type(exc).__name__)
    return error_response(
        422, "invalid_request", "the request holds a value the database cannot store "
        "(for example a NUL character, \\u0000)",
    )  # fmt: skip


async def _dependency_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("database unavailable", action="database_unavailable", error=type(exc).__name__)
    return error_response(
        503, "database_unavailable", "the database is unavailable; try again shortly",
        headers={"Retry-After": "5"},
    )  # fmt: skip


async def _pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("no free database connection", action="pool_exhausted")
    return error_response(
        503, "server_busy", "the server is at capacity; try again shortly",
        headers={"Retry-After": "1"},
    )  # fmt: skip


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", action="error")
    return error_response(500, "internal_error", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type to its envelope."""
    app.add_exception_handler(errors.ForgelineError, _forgeline_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    # The database or the queue's connection failed: the client may retry.
    app.add_exception_handler(DataError, _unstorable_input)
    app.add_exception_handler(OperationalError, _dependency_down)
    app.add_exception_handler(InterfaceError, _dependency_down)
    app.add_exception_handler(ConnectorException, _dependency_down)
    # Every pooled connection stayed busy for the pool's timeout: overload.
    app.add_exception_handler(PoolTimeoutError, _pool_exhausted)
    app.add_exception_handler(Exception, _unexpected)
