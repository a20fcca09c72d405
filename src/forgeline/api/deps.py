"""Dependencies shared by the routes, as ``Annotated`` shortcuts."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, WebSocket

from forgeline.jobs.service import JobService
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


def get_jobs(request: Request) -> JobService:
    """The job service."""
    return get_runtime(request).jobs


def get_settings_dep(request: Request) -> Settings:
    """The settings the app was built with."""
    settings: Settings = request.app.state.settings
    return settings


def get_owner() -> str | None:
    """Who is calling. Until API keys exist, every caller is the single local owner."""
    return None


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
