"""What a pipeline is, and the context it runs in.

A pipeline is a named job kind with a pydantic input model and an async
``run(ctx)``. It must be idempotent: a job is delivered at least once, so a
second run with the same input writes the same artifacts under the same keys.
"""

from __future__ import annotations

import abc
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import structlog
from pydantic import BaseModel

from forgeline.backends.base import Backend, Usage
from forgeline.storage import Storage, artifact_key


class JobRecorder(Protocol):
    """Where a running job's side effects are recorded (the database, in production)."""

    async def set_progress(self, job_id: uuid.UUID, fraction: float) -> None:
        """Store how far the job has come, 0 to 1."""

    async def record_artifact(
        self, job_id: uuid.UUID, name: str, key: str, size: int, content_type: str
    ) -> None:
        """Store (or replace) the metadata of an artifact already written."""


@dataclass
class PipelineContext:
    """Everything a pipeline may touch while it runs one job."""

    job_id: uuid.UUID
    attempt: int
    input: BaseModel
    backend: Backend
    storage: Storage
    recorder: JobRecorder
    usage: Usage = field(default_factory=lambda: Usage(0, 0))
    log: Any = field(default_factory=structlog.get_logger)

    async def progress(self, fraction: float) -> None:
        """Report progress between 0 and 1."""
        await self.recorder.set_progress(self.job_id, min(max(fraction, 0.0), 1.0))

    async def put_artifact(self, name: str, data: bytes, content_type: str) -> str:
        """Store a file under the job's deterministic key and return that key."""
        key = artifact_key(self.job_id, name)
        await self.storage.put(key, data)
        await self.recorder.record_artifact(self.job_id, name, key, len(data), content_type)
        return key

    def add_usage(self, usage: Usage) -> None:
        """Count tokens against the job (charged once, when it succeeds)."""
        self.usage = Usage(
            self.usage.prompt_tokens + usage.prompt_tokens,
            self.usage.completion_tokens + usage.completion_tokens,
        )


class Pipeline(abc.ABC):
    """Base class of every pipeline; subclasses set the class variables and ``run``."""

    #: The name clients submit jobs under; unique across installed pipelines.
    name: ClassVar[str]
    #: One line shown by ``GET /api/v1/pipelines``.
    description: ClassVar[str] = ""
    #: Validates the job's input; unknown fields should be forbidden.
    input_model: ClassVar[type[BaseModel]]

    @abc.abstractmethod
    async def run(self, ctx: PipelineContext) -> dict[str, Any]:
        """Do the work and return the job's result (a JSON object)."""
