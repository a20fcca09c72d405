"""Following a job's log: replay from a sequence number, then live, to the end.

SSE, WebSocket and the in-process ``generate`` all read through
:func:`follow`, so every transport has the same exactly-once, in-order
semantics: subscribe first, then replay from the table, then apply live
batches, skipping what was already sent and re-reading on any gap.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator

from forgeline.db.engine import SessionFactory
from forgeline.events.hub import EventHub
from forgeline.events.log import ended_by, read_events
from forgeline.events.models import Event

#: Page size when replaying from the table.
REPLAY_PAGE = 500


class StreamInterrupted(Exception):
    """The server is shutting down; the client should reconnect from ``last_seq``."""

    def __init__(self, last_seq: int) -> None:
        super().__init__(f"stream interrupted after event {last_seq}")
        self.last_seq = last_seq


async def follow(
    hub: EventHub,
    sessions: SessionFactory,
    job_id: uuid.UUID,
    *,
    after: int = 0,
    recheck_interval_s: float = 5.0,
) -> AsyncGenerator[Event, None]:
    """Yield the job's events with ``seq > after``, ending after the final one.

    Raises :class:`StreamInterrupted` once the hub interrupts its streams
    (shutdown). ``recheck_interval_s`` bounds how long a lost notification
    can delay an event.
    """
    last = after
    with hub.subscribe(job_id) as subscription:
        batch: list[Event] | None = None  # None: read the table
        while True:
            if subscription.interrupted:
                raise StreamInterrupted(last)
            if batch is None:
                batch = await _read_all(sessions, job_id, after=last)
                if not batch and await _ended_by(sessions, job_id, last):
                    return  # resumed at or past the final event: nothing is to come
            elif batch and batch[0].seq > last + 1:
                batch = await _read_all(sessions, job_id, after=last)
            for event in batch:
                if event.seq <= last:
                    continue  # already sent (replayed before this notification)
                last = event.seq
                yield event
                if event.is_final:
                    return
            batch = await subscription.next(recheck_interval_s)


async def _ended_by(sessions: SessionFactory, job_id: uuid.UUID, seq: int) -> bool:
    async with sessions() as session:
        return await ended_by(session, job_id, seq)


async def _read_all(sessions: SessionFactory, job_id: uuid.UUID, *, after: int) -> list[Event]:
    events: list[Event] = []
    async with sessions() as session:
        while True:
            page = await read_events(session, job_id, after=after, limit=REPLAY_PAGE)
            events.extend(page)
            if len(page) < REPLAY_PAGE:
                return events
            after = page[-1].seq
