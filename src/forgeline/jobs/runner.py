"""Running one job: count the attempt, run its pipeline, write the outcome once.

This is the body of the ``forgeline.run_job`` Procrastinate task. Delivery is
at least once, so every write here is conditional: an attempt starts only for
a job that is not final, and the final state is written only by the first
attempt to finish. Attempts are counted in the jobs table when they start,
which is how a job that kills its worker is recognised and parked as failed
instead of looping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from procrastinate.job_context import AbortReason, JobContext
from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert

from forgeline import metrics
from forgeline.backends.base import Backend
from forgeline.db.engine import SessionFactory
from forgeline.db.tables import ArtifactRow, JobRow, UsageRow
from forgeline.errors import ForgelineError
from forgeline.events.emitter import EventWriter
from forgeline.events.log import append_events, final_event
from forgeline.events.models import EventType
from forgeline.jobs.models import FINAL_STATUSES, JobStatus
from forgeline.jobs.queue import RetryLater
from forgeline.pipelines.base import PipelineContext
from forgeline.pipelines.registry import PipelineRegistry
from forgeline.storage import Storage

logger = structlog.get_logger("forgeline.jobs")

_NOT_FINAL = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
#: Longest wait between retries of a job that failed with a retryable error.
MAX_RETRY_DELAY_S = 300.0


class JobRunner:
    """Executes jobs delivered by the queue; also the pipelines' ``JobRecorder``."""

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        pipelines: PipelineRegistry,
        backends: Mapping[str, Backend],
        default_backend: str,
        storage: Storage,
        retry_backoff_s: float = 2.0,
    ) -> None:
        self.sessions = sessions
        self.pipelines = pipelines
        self.backends = backends
        self.default_backend = default_backend
        self.storage = storage
        self.retry_backoff_s = retry_backoff_s
        self.events = EventWriter(sessions)

    async def close(self) -> None:
        """Write the events still queued."""
        await self.events.close()

    async def run(self, queue_context: JobContext, job_id: str) -> None:
        """Run one delivery of a job; the Procrastinate task body.

        A cancellation can arrive at any await: from a user's cancel (the job
        ends ``cancelled``, keeping what it wrote) or from the worker's drain
        running out of time (the job goes back to the queue for another worker).
        """
        job_uuid = uuid.UUID(job_id)
        log = logger.bind(job_id=job_id)
        try:
            await self._run(job_uuid, log)
        except asyncio.CancelledError:
            if queue_context.abort_reason() == AbortReason.USER_REQUEST:
                log.info("job cancelled", action="job_cancelled")
                await self._finish(job_uuid, JobStatus.CANCELLED)
            else:
                log.info("job handed back to the queue", action="job_handed_back")
                await asyncio.shield(self._set_status(job_uuid, JobStatus.QUEUED))
            raise

    async def _run(self, job_uuid: uuid.UUID, log: Any) -> None:
        row = await self._start_attempt(job_uuid)
        if row is None:
            return  # already final (a duplicate delivery, or cancelled while queued)
        log = log.bind(attempt=row.attempts, pipeline=row.pipeline)
        if row.attempts > row.max_attempts:
            log.warning("job parked", action="job_parked")
            await self._finish(
                job_uuid,
                JobStatus.FAILED,
                error=(
                    "too_many_attempts",
                    f"gave up after {row.max_attempts} attempts: the worker running "
                    "the job stopped or died each time",
                ),
            )
            return
        try:
            pipeline = self.pipelines.get(row.pipeline)
            job_input = pipeline.input_model.model_validate(row.input)
        except (ForgelineError, ValueError) as exc:
            await self._finish(job_uuid, JobStatus.FAILED, error=("invalid_job", str(exc)))
            return
        log.info("job started", action="job_started")
        try:
            async with self.events.emitter(job_uuid) as emitter:
                ctx = PipelineContext(
                    job_id=job_uuid,
                    attempt=row.attempts,
                    input=job_input,
                    backend=self.backends[self.default_backend],
                    storage=self.storage,
                    recorder=self,
                    events=emitter,
                    log=log,
                )
                result = await pipeline.run(ctx)
        except ForgelineError as exc:
            if exc.retryable and row.attempts < row.max_attempts:
                delay = min(self.retry_backoff_s * 2 ** (row.attempts - 1), MAX_RETRY_DELAY_S)
                log.warning("job will retry", action="job_retry", code=exc.code, delay_s=delay)
                await self._set_status(
                    job_uuid, JobStatus.QUEUED, error=(exc.code, exc.message), retrying=True
                )
                raise RetryLater(delay) from None
            log.warning("job failed", action="job_failed", code=exc.code)
            await self._finish(job_uuid, JobStatus.FAILED, error=(exc.code, exc.message))
            return
        except Exception as exc:
            # A bug in a pipeline: record it for the owner, keep the worker alive.
            log.exception("pipeline crashed", action="job_crashed")
            await self._finish(
                job_uuid, JobStatus.FAILED, error=("pipeline_error", f"{type(exc).__name__}: {exc}")
            )
            return
        await self._finish(job_uuid, JobStatus.SUCCEEDED, result=result, usage=ctx.usage)
        log.info("job succeeded", action="job_succeeded")

    # -- writes ---------------------------------------------------------------
    async def _start_attempt(self, job_id: uuid.UUID) -> JobRow | None:
        async with self.sessions.begin() as session:
            row: JobRow | None = await session.scalar(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.in_(_NOT_FINAL))
                .values(
                    status=JobStatus.RUNNING.value,
                    attempts=JobRow.attempts + 1,
                    started_at=func.coalesce(JobRow.started_at, func.now()),
                )
                .returning(JobRow)
            )
            if row is None:
                return None
            if row.cancel_requested_at is not None:
                # Cancelled while its worker was dead: settle it now, run nothing.
                await session.execute(_final_update(job_id, JobStatus.CANCELLED))
                await append_events(session, job_id, [final_event(JobStatus.CANCELLED)])
                return None
            await append_events(
                session,
                job_id,
                [
                    (EventType.STATUS, {"status": JobStatus.RUNNING.value}),
                    (EventType.ATTEMPT, {"attempt": row.attempts}),
                ],
            )
            return row

    async def _set_status(
        self,
        job_id: uuid.UUID,
        status: JobStatus,
        *,
        error: tuple[str, str] | None = None,
        retrying: bool = False,
    ) -> None:
        values: dict[str, Any] = {"status": status.value}
        events: list[tuple[EventType, dict[str, Any]]] = []
        if error is not None:
            values.update(error_code=error[0], error_message=error[1])
            events.append(
                (EventType.ERROR, {"code": error[0], "message": error[1], "retryable": retrying})
            )
        events.append((EventType.STATUS, {"status": status.value}))
        async with self.sessions.begin() as session:
            changed = await session.scalar(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.in_(_NOT_FINAL))
                .values(values)
                .returning(JobRow.id)
            )
            if changed is not None:
                await append_events(session, job_id, events)

    async def _finish(
        self,
        job_id: uuid.UUID,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: tuple[str, str] | None = None,
        usage: Any = None,
    ) -> None:
        # Shielded: a shutdown arriving now must not leave the outcome unwritten.
        await asyncio.shield(self._write_final(job_id, status, result, error, usage))

    async def _write_final(
        self,
        job_id: uuid.UUID,
        status: JobStatus,
        result: dict[str, Any] | None,
        error: tuple[str, str] | None,
        usage: Any,
    ) -> None:
        async with self.sessions.begin() as session:
            statement = _final_update(job_id, status, result=result, error=error)
            won = (
                await session.execute(
                    statement.returning(JobRow.owner, JobRow.pipeline, JobRow.started_at)
                )
            ).first()
            if won is None:
                return  # another delivery of this job finished first
            metrics.JOBS_FINISHED.labels(won.pipeline, status.value).inc()
            if won.started_at is not None:
                elapsed = dt.datetime.now(dt.UTC) - won.started_at
                metrics.JOB_DURATION.labels(won.pipeline).observe(elapsed.total_seconds())
            await append_events(session, job_id, [final_event(status, result=result, error=error)])
            if usage is not None and status is JobStatus.SUCCEEDED:
                await session.execute(
                    insert(UsageRow)
                    .values(
                        job_id=job_id,
                        owner=won.owner,
                        prompt_tokens=usage.prompt_tokens,
                        completion_tokens=usage.completion_tokens,
                    )
                    .on_conflict_do_nothing(index_elements=[UsageRow.job_id])
                )

    # -- JobRecorder ----------------------------------------------------------
    async def set_progress(self, job_id: uuid.UUID, fraction: float) -> None:
        """Store progress while the job is still running."""
        async with self.sessions.begin() as session:
            await session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == JobStatus.RUNNING.value)
                .values(progress=fraction)
            )

    async def record_artifact(
        self, job_id: uuid.UUID, name: str, key: str, size: int, content_type: str
    ) -> None:
        """Upsert the artifact's metadata: a retry replaces, never duplicates."""
        statement = insert(ArtifactRow).values(
            job_id=job_id, name=name, storage_key=key, size=size, content_type=content_type
        )
        async with self.sessions.begin() as session:
            await session.execute(
                statement.on_conflict_do_update(
                    index_elements=[ArtifactRow.job_id, ArtifactRow.name],
                    set_={
                        "storage_key": statement.excluded.storage_key,
                        "size": statement.excluded.size,
                        "content_type": statement.excluded.content_type,
                    },
                )
            )


def _final_update(
    job_id: uuid.UUID,
    status: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
) -> Any:
    """The one write that makes a job final; matches nothing once it is final."""
    values: dict[str, Any] = {"status": status.value, "finished_at": func.now()}
    if status is JobStatus.SUCCEEDED:
        values.update(result=result, progress=1.0, error_code=None, error_message=None)
    if error is not None:
        values.update(error_code=error[0], error_message=error[1])
    return (
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.status.not_in([s.value for s in FINAL_STATUSES]))
        .values(values)
    )
