"""Appending to and reading from the ``job_events`` table.

Appends happen inside the caller's transaction, so an event and the state
change it reports commit together. Sequence numbers come from a counter on
the job's row. Each append also queues a NOTIFY on ``forgeline_events``,
which PostgreSQL delivers on commit to every API process listening; the
events travel inside the notification when small enough, so live
subscribers rarely need to read the table.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import delete, func, select, text

from forgeline.db.engine import AsyncSession
from forgeline.db.tables import JobEventRow, JobRow
from forgeline.events.models import Event, EventType

CHANNEL = "forgeline_events"
#: Revoked API key prefixes are announced here, for replicas to forget them.
REVOKED_CHANNEL = "forgeline_keys"
#: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7500


#: Hands out ``n`` sequence numbers to one job; the row lock, held to commit,
#: keeps each job's writers in order, so a reader never sees a later number
#: commit before an earlier one.
_RESERVE_ONE = text("UPDATE jobs SET event_seq = event_seq + :n WHERE id = :id RETURNING event_seq")
#: The same for many jobs: rows locked in id order (no deadlock between two
#: batches), then bumped in one statement.
_LOCK_MANY = text("SELECT id FROM jobs WHERE id = ANY(:ids) ORDER BY id FOR UPDATE")
_RESERVE_MANY = text(
    "UPDATE jobs SET event_seq = jobs.event_seq + b.n"
    " FROM unnest(CAST(:ids AS uuid[]), CAST(:ns AS bigint[])) AS b(id, n)"
    " WHERE jobs.id = b.id RETURNING jobs.id, jobs.event_seq"
)
#: Every row of a write, then its notifications, in one statement: arrays
#: rather than a statement per row, which counts at hundreds of jobs a flush.
#: (A data-modifying WITH runs whether or not the query reads it.)
_INSERT_AND_NOTIFY = text(
    "WITH inserted AS ("
    " INSERT INTO job_events (job_id, seq, type, data)"
    " SELECT * FROM unnest(CAST(:job_ids AS uuid[]), CAST(:seqs AS integer[]),"
    " CAST(:types AS varchar[]), CAST(:data AS jsonb[])))"
    " SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) AS payload"
)

#: Running jobs' progress, many at once (a finished job keeps its own).
_SET_PROGRESS = text(
    "UPDATE jobs SET progress = p.fraction"
    " FROM unnest(CAST(:ids AS uuid[]), CAST(:fractions AS float8[])) AS p(id, fraction)"
    " WHERE jobs.id = p.id AND jobs.status = 'running'"
)

EventSpec = tuple[EventType, dict[str, Any]]


async def append_events(
    session: AsyncSession, job_id: uuid.UUID, events: Sequence[EventSpec]
) -> list[Event]:
    """Append ``events`` to the job's log in the session's transaction."""
    if not events:
        return []
    last = await session.scalar(_RESERVE_ONE, {"n": len(events), "id": job_id})
    if last is None:
        raise LookupError(f"no job {job_id}")
    appended = _numbered(int(last), events)
    await _insert(session, {job_id: appended})
    return appended


async def start_log(session: AsyncSession, job_id: uuid.UUID, events: Sequence[EventSpec]) -> None:
    """Write a new job's first events, its row having been inserted with
    ``event_seq = len(events)`` in this transaction (no counter to bump)."""
    await _insert(session, {job_id: _numbered(len(events), events)})


async def append_many(
    session: AsyncSession, batches: Mapping[uuid.UUID, Sequence[EventSpec]]
) -> dict[uuid.UUID, list[Event]]:
    """Append each job's events in one transaction; jobs that do not exist are left out."""
    batches = {job_id: events for job_id, events in batches.items() if events}
    if not batches:
        return {}
    ids = list(batches)
    await session.execute(_LOCK_MANY, {"ids": ids})
    reserved = await session.execute(
        _RESERVE_MANY, {"ids": ids, "ns": [len(batches[job_id]) for job_id in ids]}
    )
    appended = {job_id: _numbered(int(last), batches[job_id]) for job_id, last in reserved}
    await _insert(session, appended)
    return appended


async def set_progress_many(session: AsyncSession, progress: Mapping[uuid.UUID, float]) -> None:
    """Store each running job's progress fraction, in the caller's transaction."""
    await session.execute(
        _SET_PROGRESS, {"ids": list(progress), "fractions": list(progress.values())}
    )


def _numbered(last: int, events: Sequence[EventSpec]) -> list[Event]:
    first = last - len(events) + 1
    return [Event(first + i, kind, data) for i, (kind, data) in enumerate(events)]


async def _insert(session: AsyncSession, appended: Mapping[uuid.UUID, list[Event]]) -> None:
    rows = [(job_id, e) for job_id, events in appended.items() for e in events]
    await session.execute(
        _INSERT_AND_NOTIFY,
        {
            "job_ids": [job_id for job_id, _ in rows],
            "seqs": [e.seq for _, e in rows],
            "types": [e.type.value for _, e in rows],
            "data": [json.dumps(e.data) for _, e in rows],
            "channel": CHANNEL,
            "payloads": notification_payloads(appended),
        },
    )


def final_event(
    status: str, *, result: dict[str, Any] | None = None, error: tuple[str, str] | None = None
) -> tuple[EventType, dict[str, Any]]:
    """The terminal event of a job that reached ``status``."""
    data: dict[str, Any] = {"status": str(status)}
    if result is not None:
        data["result"] = result
    if error is not None:
        data["error"] = {"code": error[0], "message": error[1]}
    return EventType.FINAL, data


def notification_payloads(appended: Mapping[uuid.UUID, Sequence[Event]]) -> list[str]:
    """NOTIFY payloads for newly appended events, each under PostgreSQL's limit.

    A payload is a JSON list with one entry per job: ``{"job", "last",
    "events"}``, or without ``events`` when they alone would not fit, which
    tells listeners to read the table up to ``last``. Many jobs share one
    payload, so a busy worker sends a few notifications per flush, not one
    per job.
    """
    payloads: list[str] = []
    parts: list[str] = []
    size = 2  # the brackets
    for job_id, events in appended.items():
        body: dict[str, Any] = {"job": str(job_id), "last": events[-1].seq}
        part = json.dumps({**body, "events": [e.as_json() for e in events]})
        if len(part.encode()) + 2 > MAX_PAYLOAD_BYTES:
            part = json.dumps(body)
        part_size = len(part.encode()) + 1  # and a comma
        if parts and size + part_size > MAX_PAYLOAD_BYTES:
            payloads.append("[" + ",".join(parts) + "]")
            parts, size = [], 2
        parts.append(part)
        size += part_size
    if parts:
        payloads.append("[" + ",".join(parts) + "]")
    return payloads


async def read_events(
    session: AsyncSession, job_id: uuid.UUID, *, after: int = 0, limit: int = 1000
) -> list[Event]:
    """Events with ``seq > after``, oldest first."""
    rows = await session.execute(
        select(JobEventRow.seq, JobEventRow.type, JobEventRow.data)
        .where(JobEventRow.job_id == job_id, JobEventRow.seq > after)
        .order_by(JobEventRow.seq)
        .limit(limit)
    )
    return [Event(seq, EventType(kind), data) for seq, kind, data in rows]


async def ended_by(session: AsyncSession, job_id: uuid.UUID, seq: int) -> bool:
    """Whether the job's final event has a sequence number of ``seq`` or less."""
    found = await session.scalar(
        select(JobEventRow.seq)
        .where(
            JobEventRow.job_id == job_id,
            JobEventRow.type == EventType.FINAL.value,
            JobEventRow.seq <= seq,
        )
        .limit(1)
    )
    return found is not None


async def compact_finished(session: AsyncSession, *, older_than_s: float) -> int:
    """Delete all but the final event of jobs finished more than ``older_than_s`` ago.

    The job's result and artifacts stay; a replay then gives just the outcome.
    """
    finished = select(JobRow.id).where(
        JobRow.finished_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_s)
    )
    result = await session.execute(
        delete(JobEventRow).where(
            JobEventRow.job_id.in_(finished), JobEventRow.type != EventType.FINAL.value
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)
