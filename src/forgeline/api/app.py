"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.cors import CORSMiddleware

from forgeline import __version__, telemetry
from forgeline.api.errors import install_error_handlers
from forgeline.api.middleware import HttpMiddleware, JsonGZipMiddleware
from forgeline.api.openapi import COMMON_RESPONSES, install_openapi
from forgeline.api.routes import admin, events, health, jobs, pipelines
from forgeline.api.routes.events import StreamSlots
from forgeline.pipelines.registry import PipelineRegistry, load_pipelines
from forgeline.runtime import Runtime
from forgeline.settings import Settings

logger = structlog.get_logger("forgeline.api")


def create_app(
    settings: Settings, *, with_worker: bool = False, runtime: Runtime | None = None
) -> FastAPI:
    """Build the API; with ``with_worker``, the same process also runs jobs.

    Pass a started ``runtime`` to have start-up errors raised to the caller
    before the server listens; otherwise the lifespan starts one.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal runtime
        if runtime is None:
            runtime = await Runtime.start(settings)
        app.state.runtime = runtime
        runtime.hub.start()
        # One signal for everything: the worker starts draining the moment
        # shutdown begins, alongside the HTTP side, so the two budgets overlap.
        stop: asyncio.Event = app.state.stopping
        worker = asyncio.create_task(runtime.run_worker(stop)) if with_worker else None
        interrupter = asyncio.create_task(_interrupt_streams_on(stop, runtime))
        logger.info("forgeline ready", action="start", worker=with_worker, version=__version__)
        try:
            yield
        finally:
            stop.set()
            await interrupter
            if worker is not None:
                await worker
            await runtime.close()
            telemetry.shutdown()
            logger.info("forgeline stopped", action="stop")

    app = FastAPI(
        title="forgeline",
        version=__version__,
        description="Durable, streaming AI generation jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    # Set when shutdown begins: readiness fails and streams say "reconnect".
    app.state.stopping = asyncio.Event()
    # Fire-and-forget work started by routes, kept referenced until done.
    app.state.background_tasks = set()
    app.state.streams = StreamSlots(settings.max_streams_per_key)
    if runtime is not None:
        app.state.runtime = runtime
    app.state.started_at = time.monotonic()
    install_error_handlers(app)
    telemetry.instrument_app(app)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID",
                           "X-Request-ID"],
            expose_headers=["Location", "Retry-After", "RateLimit-Limit", "RateLimit-Remaining",
                            "RateLimit-Reset", "X-Request-ID"],
            max_age=600,
        )  # fmt: skip
    app.add_middleware(JsonGZipMiddleware, minimum_size=1024)
    app.add_middleware(
        HttpMiddleware,
        max_body_bytes=settings.max_body_bytes,
        request_timeout_s=settings.request_timeout_s,
    )
    app.include_router(health.router)
    for api in (jobs.router, events.router, pipelines.router, admin.router):
        app.include_router(api, responses=COMMON_RESPONSES)
    # For the Allow header of a 405, which Starlette fills from one route only.
    app.state.http_routes = [
        route
        for router in (health.router, jobs.router, events.router, pipelines.router, admin.router)
        for route in router.routes
        if isinstance(route, APIRoute)
    ]

    def installed_pipelines() -> PipelineRegistry:
        # The running runtime's once started; before that (a document built
        # without serving), the ones these settings name.
        running: Runtime | None = getattr(app.state, "runtime", None)
        return running.pipelines if running is not None else load_pipelines(settings.pipelines)

    install_openapi(app, installed_pipelines)
    return app


async def _interrupt_streams_on(stop: asyncio.Event, runtime: Runtime) -> None:
    """When shutdown begins, end every stream with a "reconnect" event."""
    await stop.wait()
    runtime.hub.interrupt_streams()


def create_probe_app(settings: Settings, runtime: Runtime, stopping: asyncio.Event) -> FastAPI:
    """A worker's own small app: ``/healthz``, ``/readyz`` and ``/metrics``."""
    app = FastAPI(title="forgeline worker", version=__version__, openapi_url=None)
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.stopping = stopping
    app.state.started_at = time.monotonic()
    install_error_handlers(app)
    app.include_router(health.router)
    return app
