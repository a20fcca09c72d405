"""The job service: submit, read, list and cancel jobs.

Routes and the CLI call these functions; SQL and queue calls stay here.
Every read takes the caller's ``owner`` so one tenant never sees another's
jobs: a job that exists but belongs to someone else is "not found".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from procrastinate import App
from sqlalchemy import ColumnElement, Select, func, select, text, tuple_
from sqlalchemy.exc import IntegrityError

from forgeline.db.engine import AsyncSession, SessionFactory
from forgeline.db.tables import ArtifactRow, JobRow, UsageRow
from forgeline.errors import ConflictError, InvalidInputError, NotFoundError, RateLimitedError
from forgeline.events.log import append_events, compact_finished, final_event, start_log
from forgeline.events.models import EventType
from forgeline.jobs import queue
from forgeline.jobs.models import Artifact, Job, JobError, JobStatus
from forgeline.pipelines.registry import PipelineRegistry

MAX_PAGE_SIZE = 100
#: A page cursor: microseconds since the epoch and a job id, the position
#: after which the next page starts. Every string of this form is a valid one.
CURSOR_PATTERN = r"^[0-9]{1,16}_[0-9a-f]{32}$"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


@dataclass(frozen=True)
class Submission:
    """The outcome of a submit: the job, and whether this call created it."""

    job: Job
    created: bool


@dataclass(frozen=True)
class Page:
    """One page of a job listing, with the cursor of the next page if any."""

    items: Sequence[Job]
    next_cursor: str | None


#: Jobs that hold one of their owner's slots.
ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


@dataclass(frozen=True)
class Quota:
    """What one owner may have and use; checked when a job is submitted."""

    max_active_jobs: int
    max_tokens_per_job: int
    daily_tokens: int = 0  # 0: no daily quota

    def check_input(self, job_input: dict[str, Any]) -> None:
        """Refuse a job asking for more tokens than one job may generate."""
        asked = job_input.get("max_tokens")
        if isinstance(asked, int) and asked > self.max_tokens_per_job:
            raise InvalidInputError(
                f"max_tokens {asked} is over this server's cap of {self.max_tokens_per_job} per job"
            )

    async def enforce(self, session: AsyncSession, owner: str) -> None:
        """Refuse a job over the owner's limits, in the submitting transaction.

        Call it last, once the new job's row is written: submissions of one
        owner are serialised by an advisory lock, held from here to the
        commit, and the count after taking it sees every job committed
        before plus this one, so two concurrent requests cannot both take
        the last free slot.
        """
        await session.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:owner, 1))"), {"owner": owner}
        )
        active = await session.scalar(
            select(func.count())
            .select_from(JobRow)
            .where(JobRow.owner == owner, JobRow.status.in_(ACTIVE_STATUSES))
        )
        others = int(active or 0) - 1  # the count includes the job being submitted
        if others >= self.max_active_jobs:
            raise RateLimitedError(
                f"this key already has {others} queued or running jobs (the cap "
                f"is {self.max_active_jobs}); wait for one to finish",
                retry_after_s=5,
            )
        if self.daily_tokens:
            midnight = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            used = await session.scalar(
                select(func.coalesce(func.sum(UsageRow.completion_tokens), 0)).where(
                    UsageRow.owner == owner, UsageRow.created_at >= midnight
                )
            )
            if int(used or 0) >= self.daily_tokens:
                tomorrow = midnight + dt.timedelta(days=1)
                raise RateLimitedError(
                    f"this key has used its {self.daily_tokens} tokens for today (UTC)",
                    retry_after_s=(tomorrow - dt.datetime.now(dt.UTC)).total_seconds(),
                )


class JobService:
    """Stores and queues jobs; reads them back for their owner."""

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        queue_app: App,
        pipelines: PipelineRegistry,
        max_attempts: int = 3,
    ) -> None:
        self.sessions = sessions
        self.queue_app = queue_app
        self.pipelines = pipelines
        self.max_attempts = max_attempts

    async def submit(
        self,
        *,
        owner: str | None,
        pipeline: str,
        job_input: Any,
        idempotency_key: str | None = None,
        cancel_on_disconnect: bool = False,
        quota: Quota | None = None,
    ) -> Submission:
        """Validate, store and queue a job in one transaction.

        With an ``idempotency_key``, a repeat of the same request returns the
        first job, and the same key with a different request is a conflict.
        With a ``quota``, the owner's limits are checked in that transaction.
        """
        normalised = self.pipelines.validate_input(pipeline, job_input)
        if quota is not None:
            quota.check_input(normalised)
        request_hash = _request_hash(pipeline, normalised)
        if idempotency_key is not None:
            existing = await self._find_by_key(owner, idempotency_key, request_hash)
            if existing is not None:
                return Submission(existing, created=False)
        job_id = uuid.uuid4()
        try:
            async with self.sessions.begin() as session:
                queued = [(EventType.STATUS, {"status": JobStatus.QUEUED.value})]
                # Queue row, job row and first event in one transaction: a
                # worker sees the job only once all three are committed.
                queue_job_id = await queue.defer(
                    self.queue_app, job_id, await _driver_connection(session)
                )
                row = JobRow(
                    id=job_id,
                    pipeline=pipeline,
                    input=normalised,
                    status=JobStatus.QUEUED.value,
                    owner=owner,
                    attempts=0,
                    max_attempts=self.max_attempts,
                    progress=0.0,
                    idempotency_key=idempotency_key,
                    request_hash=request_hash,
                    cancel_on_disconnect=cancel_on_disconnect,
                    queue_job_id=queue_job_id,
                    event_seq=len(queued),
                )
                session.add(row)
                await session.flush()
                await start_log(session, job_id, queued)
                if quota is not None and owner is not None:
                    await quota.enforce(session, owner)
        except IntegrityError:
            # Another request with the same key won the race; answer as it did.
            if idempotency_key is None:
                raise
            existing = await self._find_by_key(owner, idempotency_key, request_hash)
            if existing is None:
                raise
            return Submission(existing, created=False)
        return Submission(_to_job(row, ()), created=True)

    async def watch(self, job_id: uuid.UUID, change: int) -> int:
        """Count a stream of ``job_id`` opening (+1) or closing (-1); the open streams left."""
        async with self.sessions.begin() as session:
            left = await session.scalar(
                text(
                    "UPDATE jobs SET watchers = greatest(watchers + :change, 0)"
                    " WHERE id = :id RETURNING watchers"
                ),
                {"change": change, "id": job_id},
            )
        return int(left or 0)

    async def get(
        self, job_id: str | uuid.UUID, *, owner: str | None, artifacts: bool = True
    ) -> Job:
        """The caller's job; ``NotFoundError`` if absent or someone else's.

        ``artifacts=False`` leaves the artifact list empty, one query fewer
        for callers that only need the job itself (opening a stream).
        """
        async with self.sessions() as session:
            row = await session.scalar(_owned(owner).where(JobRow.id == _parse_id(job_id)))
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            if not artifacts:
                return _to_job(row, ())
            found = await session.scalars(
                select(ArtifactRow).where(ArtifactRow.job_id == row.id).order_by(ArtifactRow.name)
            )
            return _to_job(row, found.all())

    async def list_jobs(
        self,
        *,
        owner: str | None,
        status: JobStatus | None = None,
        pipeline: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> Page:
        """The caller's jobs, newest first, ``limit`` at a time."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidInputError(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        statement = _owned(owner)
        if status is not None:
            statement = statement.where(JobRow.status == status.value)
        if pipeline is not None:
            statement = statement.where(JobRow.pipeline == pipeline)
        if cursor is not None:
            created_at, last_id = _decode_cursor(cursor)
            statement = statement.where(
                tuple_(JobRow.created_at, JobRow.id) < (created_at, last_id)
            )
        statement = statement.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)
        async with self.sessions() as session:
            rows = (await session.scalars(statement)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1]) if more and rows else None
        return Page([_to_job(row, ()) for row in rows], next_cursor)

    async def cancel(self, job_id: str | uuid.UUID, *, owner: str | None) -> Job:
        """Cancel a queued job at once, or ask a running one to stop.

        A running job stops cooperatively within about a second: its worker is
        notified and cancels the pipeline, which keeps what it produced so far.
        """
        parsed = _parse_id(job_id)
        async with self.sessions.begin() as session:
            row = await session.scalar(_owned(owner).where(JobRow.id == parsed).with_for_update())
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            status = JobStatus(row.status)
            if status.is_final:
                raise ConflictError(f"job {job_id} is already {status.value}")
            connection = await _driver_connection(session)
            if status is JobStatus.QUEUED and row.queue_job_id is not None:
                removed = await queue.cancel(
                    self.queue_app, row.queue_job_id, connection, abort=False
                )
                if removed:
                    row.status = JobStatus.CANCELLED.value
                    row.finished_at = func.now()
                    await append_events(session, parsed, [final_event(JobStatus.CANCELLED)])
            if row.status != JobStatus.CANCELLED.value:
                # Running (or just picked up): the worker settles the final state.
                row.cancel_requested_at = func.now()
                if row.queue_job_id is not None:
                    await queue.cancel(self.queue_app, row.queue_job_id, connection, abort=True)
        return await self.get(parsed, owner=owner)

    async def artifact(self, job_id: str | uuid.UUID, name: str, *, owner: str | None) -> Artifact:
        """Metadata of one of the caller's job's artifacts."""
        job = await self.get(job_id, owner=owner)
        for artifact in job.artifacts:
            if artifact.name == name:
                return artifact
        raise NotFoundError(f"job {job_id} has no artifact {name!r}")

    async def recover_stalled(self, *, stall_threshold_s: float) -> list[uuid.UUID]:
        """Hand back to the queue the jobs of dead workers (the periodic sweep).

        Each job is handed back in one transaction with its row: the queue
        entry stays locked until the job reads ``queued`` (or ``cancelled``,
        when a cancel came while its worker was dead), so no worker can start
        it half-way. Several workers may sweep at once; one wins each job.
        """
        recovered: list[uuid.UUID] = []
        for queue_job in await queue.find_stalled(
            self.queue_app, stall_threshold_s=stall_threshold_s
        ):
            job_id = uuid.UUID(str(queue_job.task_kwargs["job_id"]))
            async with self.sessions.begin() as session:
                if not await queue.hand_back(session, queue_job):
                    continue
                row = await session.scalar(
                    select(JobRow).where(JobRow.id == job_id).with_for_update()
                )
                if row is None or JobStatus(row.status).is_final:
                    continue
                if row.cancel_requested_at is not None:
                    row.status = JobStatus.CANCELLED.value
                    row.finished_at = func.now()
                    await append_events(session, job_id, [final_event(JobStatus.CANCELLED)])
                else:
                    row.status = JobStatus.QUEUED.value
                    await append_events(
                        session, job_id, [(EventType.STATUS, {"status": JobStatus.QUEUED.value})]
                    )
            recovered.append(job_id)
        await queue.prune_dead_workers(self.queue_app, stall_threshold_s=stall_threshold_s)
        return recovered

    async def compact_events(self, *, older_than_s: float) -> int:
        """Drop the streamed detail of jobs finished long ago (results stay)."""
        async with self.sessions.begin() as session:
            return await compact_finished(session, older_than_s=older_than_s)

    async def _find_by_key(self, owner: str | None, key: str, request_hash: str) -> Job | None:
        async with self.sessions() as session:
            row = await session.scalar(_owned(owner).where(JobRow.idempotency_key == key))
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise ConflictError(
                "this Idempotency-Key was already used with a different request",
                details={"job_id": str(row.id)},
            )
        return await self.get(row.id, owner=owner)


def _owned(owner: str | None) -> Select[JobRow]:
    condition: ColumnElement[bool] = JobRow.owner.is_not_distinct_from(owner)
    return select(JobRow).where(condition)


def _parse_id(job_id: str | uuid.UUID) -> uuid.UUID:
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise NotFoundError(f"no job {job_id}") from None


async def _driver_connection(session: AsyncSession) -> Any:
    """The psycopg connection under ``session``, for Procrastinate to share."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return raw.driver_connection


def _request_hash(pipeline: str, job_input: dict[str, Any]) -> str:
    canonical = json.dumps([pipeline, job_input], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _encode_cursor(row: JobRow) -> str:
    return f"{(row.created_at - _EPOCH) // _MICROSECOND}_{row.id.hex}"


def _decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    if not re.fullmatch(CURSOR_PATTERN, cursor):
        raise InvalidInputError("cursor is not one this API returned")
    micros, _, job_id = cursor.partition("_")
    return _EPOCH + int(micros) * _MICROSECOND, uuid.UUID(hex=job_id)


def _to_job(row: JobRow, artifacts: Sequence[ArtifactRow]) -> Job:
    error = JobError(row.error_code, row.error_message or "") if row.error_code else None
    return Job(
        id=row.id,
        pipeline=row.pipeline,
        input=row.input,
        status=JobStatus(row.status),
        owner=row.owner,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        progress=row.progress,
        result=row.result,
        error=error,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        updated_at=row.updated_at,
        cancel_on_disconnect=row.cancel_on_disconnect,
        artifacts=tuple(Artifact(a.name, a.storage_key, a.size, a.content_type) for a in artifacts),
    )
