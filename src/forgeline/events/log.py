"""Appending to and reading from the ``job_events`` table.

Appends happen inside the caller's transaction, so an event and the state
change it reports commit together. Each append also queues a NOTIFY on
``forgeline_events``, which PostgreSQL delivers on commit to every API
process listening; small batches travel inside the notification, so live
subscribers rarely need to read the table.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select, text

from forgeline.db.engine import AsyncSession
from forgeline.db.tables import JobEventRow, JobRow
from forgeline.events.models import Event, EventType

CHANNEL = "forgeline_events"
#: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7500


async def append_events(
    session: AsyncSession, job_id: uuid.UUID, events: Sequence[tuple[EventType, dict[str, Any]]]
) -> list[Event]:
    """Append ``events`` to the job's log in the session's transaction."""
    if not events:
        return []
    # One writer per job at a time, so sequence numbers never collide or skip.
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": str(job_id)}
    )
    last = await session.scalar(
        select(func.coalesce(func.max(JobEventRow.seq), 0)).where(JobEventRow.job_id == job_id)
    )
    appended = [Event(int(last or 0) + i + 1, kind, data) for i, (kind, data) in enumerate(events)]
    await session.execute(
        insert(JobEventRow),
        [{"job_id": job_id, "seq": e.seq, "type": e.type.value, "data": e.data} for e in appended],
    )
    await session.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": CHANNEL, "payload": notification_payload(job_id, appended)},
    )
    return appended


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


def notification_payload(job_id: uuid.UUID, events: Sequence[Event]) -> str:
    """The NOTIFY payload: the events themselves when small enough, else their range."""
    body: dict[str, Any] = {"job": str(job_id), "last": events[-1].seq}
    with_events = json.dumps({**body, "events": [e.as_json() for e in events]})
    if len(with_events.encode()) <= MAX_PAYLOAD_BYTES:
        return with_events
    return json.dumps(body)


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
