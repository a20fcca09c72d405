"""Prometheus metrics: HTTP, jobs, queue, backends, streams, rate limits, database pool.

Each process counts what it does itself: API processes the requests,
submissions and streams; workers the jobs they finish and the backend calls
they make. Prometheus scrapes every process (the API at ``/metrics``, a
worker on ``FORGELINE_METRICS_PORT``) and sums across them. Queue depth and
running jobs are read from the database at scrape time, so every process
reports the same, whole-deployment figure: aggregate those with ``max``.

HTTP metrics are labelled by route template (``/api/v1/jobs/{job_id}``),
never by raw path, so label sets stay bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from forgeline.backends.base import Backend, GenerationRequest
from forgeline.db.tables import JobRow

if TYPE_CHECKING:
    from forgeline.runtime import Runtime

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

HTTP_REQUESTS = Counter(
    "http_requests", "HTTP requests answered.", ["method", "route", "status"], registry=REGISTRY
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request (to the end of the body; streams excluded).",
    ["method", "route"],
    registry=REGISTRY,
)
JOBS_SUBMITTED = Counter(
    "forgeline_jobs_submitted", "Jobs accepted.", ["pipeline"], registry=REGISTRY
)
JOBS_FINISHED = Counter(
    "forgeline_jobs_finished", "Jobs that reached a final state.", ["pipeline", "status"],
    registry=REGISTRY,
)  # fmt: skip
JOB_DURATION = Histogram(
    "forgeline_job_duration_seconds",
    "From a job's first start to its final state.",
    ["pipeline"],
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("forgeline_queue_depth", "Jobs waiting to run.", registry=REGISTRY)
JOBS_RUNNING = Gauge("forgeline_jobs_running", "Jobs running now.", registry=REGISTRY)
BACKEND_REQUESTS = Counter(
    "forgeline_backend_requests",
    "Generations asked of a model backend, by outcome (ok, error, cancelled).",
    ["backend", "outcome"],
    registry=REGISTRY,
)
BACKEND_TTFT = Histogram(
    "forgeline_backend_ttft_seconds",
    "Time from asking a backend to its first piece of text.",
    ["backend"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
TOKENS = Counter(
    "forgeline_tokens_generated",
    "Tokens generated (as the backend reports them; else pieces of text).",
    ["backend"],
    registry=REGISTRY,
)
STREAM_SUBSCRIBERS = Gauge(
    "forgeline_stream_subscribers", "Open event streams in this process.", registry=REGISTRY
)
RATELIMIT_REJECTIONS = Counter(
    "forgeline_ratelimit_rejections", "Requests refused by a rate limit.", registry=REGISTRY
)
DB_POOL_SIZE = Gauge(
    "forgeline_db_pool_size", "Connections the database pool keeps.", registry=REGISTRY
)
DB_POOL_CONNECTIONS = Gauge(
    "forgeline_db_pool_connections",
    "Database pool connections by state (checked_out, idle, overflow).",
    ["state"],
    registry=REGISTRY,
)
#: Longest the database may take to give the queue figures at scrape time.
SCRAPE_QUERY_TIMEOUT_S = 2.0


async def render(runtime: Runtime) -> bytes:
    """The exposition text, with queue, stream and pool figures read now."""
    await refresh(runtime)
    return generate_latest(REGISTRY)


async def refresh(runtime: Runtime) -> None:
    """Read the gauges that describe the present moment."""
    STREAM_SUBSCRIBERS.set(runtime.hub.subscriber_count)
    pool = runtime.engine.pool
    size = getattr(pool, "size", None)
    if callable(size):
        DB_POOL_SIZE.set(size())
        DB_POOL_CONNECTIONS.labels("checked_out").set(pool.checkedout())  # type: ignore[attr-defined]
        DB_POOL_CONNECTIONS.labels("idle").set(pool.checkedin())  # type: ignore[attr-defined]
        DB_POOL_CONNECTIONS.labels("overflow").set(max(0, pool.overflow()))  # type: ignore[attr-defined]
    try:
        async with asyncio.timeout(SCRAPE_QUERY_TIMEOUT_S), runtime.sessions() as session:
            rows = await session.execute(
                select(JobRow.status, func.count())
                .where(JobRow.status.in_(("queued", "running")))
                .group_by(JobRow.status)
            )
            counts: dict[str, int] = dict(rows.all())
    except (SQLAlchemyError, OSError, TimeoutError):
        return  # the database is down: keep the last figures; readiness says why
    QUEUE_DEPTH.set(counts.get("queued", 0))
    JOBS_RUNNING.set(counts.get("running", 0))


class MeteredBackend(Backend):
    """Wraps a backend to count its requests, outcomes, first-token times and tokens."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name

    async def stream(self, request: GenerationRequest) -> AsyncIterator[object]:  # type: ignore[override]
        started = time.monotonic()
        first = True
        pieces = 0
        reported = 0
        outcome = "error"
        try:
            async for delta in self.inner.stream(request):
                if first and delta.text:
                    BACKEND_TTFT.labels(self.name).observe(time.monotonic() - started)
                    first = False
                if delta.text:
                    pieces += 1
                if delta.usage is not None:
                    reported = delta.usage.completion_tokens
                yield delta
            outcome = "ok"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            BACKEND_REQUESTS.labels(self.name, outcome).inc()
            TOKENS.labels(self.name).inc(reported or pieces)

    async def check(self) -> str:
        return await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()
