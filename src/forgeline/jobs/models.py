"""Domain records for jobs, separate from the API's request and response schemas."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from dataclasses import dataclass
from typing import Any


class JobStatus(enum.StrEnum):
    """Where a job stands. ``succeeded``, ``failed`` and ``cancelled`` are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True once the job will never change again."""
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable code and a message for people."""

    code: str
    message: str


@dataclass(frozen=True)
class Artifact:
    """A file a job stored in object storage."""

    name: str
    storage_key: str
    size: int
    content_type: str


@dataclass(frozen=True)
class Job:
    """A generation job as stored."""

    id: uuid.UUID
    pipeline: str
    input: dict[str, Any]
    status: JobStatus
    owner: str | None
    attempts: int
    max_attempts: int
    progress: float
    result: dict[str, Any] | None
    error: JobError | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime
    cancel_on_disconnect: bool = False
    artifacts: tuple[Artifact, ...] = ()
