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
from forgeline.events.models import EventType
from forgeline.storage import Storage, artifact_key


class EventSink(Protocol):
    """Where a running job's live output goes (the job's event log, in production)."""

    async def token(self, text: str) -> None:
        """Queue generated text for the stream."""

    async def progress(self, fraction: float) -> None:
        """Queue how far the job has come (0 to 1), after any queued text."""

    async def emit(self, kind: EventType, data: dict[str, Any]) -> None:
        """Write an event now, after any queued text."""


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
    events: EventSink | None = None
    usage: Usage = field(default_factory=lambda: Usage(0, 0))
    log: Any = field(default_factory=structlog.get_logger)

    async def progress(self, fraction: float) -> None:
        """Report progress between 0 and 1."""
        fraction = min(max(fraction, 0.0), 1.0)
        if self.events is not None:
            # Queued with the stream's text: the generation does not wait on it.
            await self.events.progress(fraction)
        else:
            await self.recorder.set_progress(self.job_id, fraction)

    async def token(self, text: str) -> None:
        """Stream generated text to the job's followers (batched, in order)."""
        if self.events is not None:
            await self.events.token(text)

    async def put_artifact(self, name: str, data: bytes, content_type: str) -> str:
        """Store a file under the job's deterministic key and return that key."""
        key = artifact_key(self.job_id, name)
        await self.storage.put(key, data)
        await self.recorder.record_artifact(self.job_id, name, key, len(data), content_type)
        if self.events is not None:
            await self.events.emit(
                EventType.ARTIFACT,
                {
                    "name": name,
                    "size": len(data),
                    "content_type": content_type,
                    "url": f"/api/v1/jobs/{self.job_id}/artifacts/{name}",
                },
            )
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
