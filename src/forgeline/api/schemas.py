"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from forgeline.jobs.models import Job, JobStatus


class JobCreate(BaseModel):
    """A job to run. Server-owned fields (status, owner, attempts) are refused."""

    # strict: 0 or "true" is not a boolean; the body must match the document.
    model_config = ConfigDict(extra="forbid", strict=True)

    pipeline: str = Field(min_length=1, max_length=100, examples=["story"])
    input: dict[str, Any] = Field(
        default_factory=dict, examples=[{"prompt": "A lighthouse keeper finds a door in the sea"}]
    )
    cancel_on_disconnect: bool = Field(
        default=False,
        description="Cancel the job when its last stream client disconnects.",
    )


class ErrorOut(BaseModel):
    """What went wrong with a job."""

    code: str
    message: str


class ArtifactOut(BaseModel):
    """A file the job stored, with where to download it."""

    name: str
    size: int
    content_type: str
    url: str


class JobOut(BaseModel):
    """A job as clients see it."""

    id: uuid.UUID
    pipeline: str
    status: JobStatus
    input: dict[str, Any]
    attempts: int
    max_attempts: int
    cancel_on_disconnect: bool
    progress: float
    result: dict[str, Any] | None
    error: ErrorOut | None
    artifacts: list[ArtifactOut]
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime

    @classmethod
    def from_job(cls, job: Job) -> JobOut:
        """Shape a stored job for the API."""
        return cls(
            id=job.id,
            pipeline=job.pipeline,
            status=job.status,
            input=job.input,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            cancel_on_disconnect=job.cancel_on_disconnect,
            progress=job.progress,
            result=job.result,
            error=ErrorOut(code=job.error.code, message=job.error.message) if job.error else None,
            artifacts=[
                ArtifactOut(
                    name=a.name,
                    size=a.size,
                    content_type=a.content_type,
                    url=f"/api/v1/jobs/{job.id}/artifacts/{a.name}",
                )
                for a in job.artifacts
            ],
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
        )


class JobPage(BaseModel):
    """One page of jobs; pass ``next_cursor`` as ``cursor`` for the next."""

    items: list[JobOut]
    next_cursor: str | None


class PipelineOut(BaseModel):
    """A pipeline and the JSON schema of its input."""

    name: str
    description: str
    input_schema: dict[str, Any]


class PipelineList(BaseModel):
    """Every pipeline this deployment runs."""

    items: list[PipelineOut]


class CheckOut(BaseModel):
    """One dependency's readiness."""

    ok: bool
    critical: bool
    detail: str
    duration_ms: float


class ReadinessOut(BaseModel):
    """Whether this process should receive traffic, and why."""

    status: str
    version: str
    uptime_s: float
    checks: dict[str, CheckOut]


class ErrorBody(BaseModel):
    """The error envelope's content."""

    code: str
    message: str
    details: Any = None


class ErrorEnvelope(BaseModel):
    """Every error response: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorBody
