"""Probes: ``/healthz`` (liveness) and ``/readyz`` (readiness)."""

from __future__ import annotations

import hmac
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from forgeline import __version__, metrics
from forgeline.api.deps import RuntimeDep
from forgeline.api.schemas import CheckOut, ReadinessOut
from forgeline.errors import UnauthorizedError
from forgeline.health import run_checks

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. Touches no dependency."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadinessOut, responses={503: {"model": ReadinessOut}})
async def readyz(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """Readiness: 503 while a critical dependency fails, with each check's detail."""
    results = await run_checks(runtime)
    stopping = request.app.state.stopping.is_set()
    ready = all(r.ok for r in results if r.critical) and not stopping
    body = ReadinessOut(
        status="ready" if ready else "not_ready",
        version=__version__,
        uptime_s=round(time.monotonic() - request.app.state.started_at, 1),
        checks={
            r.name: CheckOut(
                ok=r.ok, critical=r.critical, detail=r.detail, duration_ms=r.duration_ms
            )
            for r in results
        },
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
async def prometheus_metrics(request: Request, runtime: RuntimeDep) -> Response:
    """Prometheus metrics; with ``FORGELINE_METRICS_TOKEN`` set, only for its bearer."""
    token = runtime.settings.metrics_token
    if token is not None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        expected = token.get_secret_value()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), expected):
            raise UnauthorizedError("/metrics needs 'Authorization: Bearer <metrics token>'")
    return Response(await metrics.render(runtime), media_type=CONTENT_TYPE_LATEST)
