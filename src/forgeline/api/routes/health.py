"""Probes: ``/healthz`` (liveness) and ``/readyz`` (readiness)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from forgeline import __version__
from forgeline.api.deps import RuntimeDep
from forgeline.api.schemas import CheckOut, ReadinessOut
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
