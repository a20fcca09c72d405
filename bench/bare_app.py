"""``GET /api/v1/jobs/{id}`` with nothing around it: the baseline of ``bench.middleware_overhead``.

One FastAPI route whose body is the real handler's, ``jobs.get`` then
``JobOut.from_job``, on a :class:`~forgeline.runtime.Runtime` started from the
same ``FORGELINE_*`` settings as ``forgeline api`` (same database pool, same
log set-up). Left out: every middleware (request id, time limit, security
headers, access log, metrics, JSON gzip), the error handlers, and the
authentication dependency with its rate limits. The owner whose job it reads
is resolved once at start from ``FORGELINE_ADMIN_KEY``, not per request.

    FORGELINE_DATABASE_URL=... FORGELINE_ADMIN_KEY=... FORGELINE_PORT=8001 \\
        python -m bench.bare_app
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from forgeline.api.schemas import JobOut
from forgeline.errors import ConfigurationError
from forgeline.logs import configure_logging
from forgeline.runtime import Runtime
from forgeline.settings import Settings, get_settings


def create_bare_app(settings: Settings) -> FastAPI:
    """The single route, on a runtime its lifespan starts and closes."""
    runtime: Runtime | None = None
    owner = ""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal runtime, owner
        if settings.admin_key is None:
            raise ConfigurationError("FORGELINE_ADMIN_KEY: required (the owner of the job read)")
        runtime = await Runtime.start(settings)
        try:
            key = await runtime.keys.authenticate(settings.admin_key.get_secret_value())
            if key is None:
                raise ConfigurationError("FORGELINE_ADMIN_KEY: not accepted by the database")
            owner = key.owner
            yield
        finally:
            await runtime.close()

    app = FastAPI(title="forgeline bare", openapi_url=None, lifespan=lifespan)

    @app.get("/api/v1/jobs/{job_id}", response_model=JobOut)
    async def get_job(job_id: str) -> JobOut:
        """One job: the body of the real route, without its dependencies."""
        if runtime is None:  # the lifespan sets it before the first request
            raise RuntimeError("not started")
        return JobOut.from_job(await runtime.jobs.get(job_id, owner=owner))

    return app


def main() -> None:
    """Serve the bare app on ``FORGELINE_HOST``/``FORGELINE_PORT`` as ``forgeline api`` would."""
    settings = get_settings()
    configure_logging(settings)
    config = uvicorn.Config(
        create_bare_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
