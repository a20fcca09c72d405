"""Following a job's log: replay from a sequence number, then live, to the end.

SSE, WebSocket and the in-process ``generate`` all read through
:func:`follow`, so every transport has the same exactly-once, in-order
semantics: subscribe first, then replay from the table, then apply live
batches, skipping what was already sent and re-reading on any gap.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator

from forgeline.db.engine import SessionFactory
from forgeline.events.hub import EventHub, Subscription
from forgeline.events.log import read_events
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
    stopping: asyncio.Event | None = None,
    recheck_interval_s: float = 5.0,
) -> AsyncGenerator[Event, None]:
    """Yield the job's events with ``seq > after``, ending after the final one.

    Raises :class:`StreamInterrupted` when ``stopping`` is set first.
    ``recheck_interval_s`` bounds how long a lost notification can delay an
    event.
    """
    last = after
    with hub.subscribe(job_id) as subscription:
        batch: list[Event] | None = None  # None: read the table
        while True:
            if batch is None or (batch and batch[0].seq > last + 1):
                batch = await _read_all(sessions, job_id, after=last)
            for event in batch:
                if event.seq <= last:
                    continue  # already sent (replayed before this notification)
                last = event.seq
                yield event
                if event.is_final:
                    return
            batch = await _next_batch(subscription, recheck_interval_s, stopping, last)


async def _next_batch(
    subscription: Subscription, timeout_s: float, stopping: asyncio.Event | None, last: int
) -> list[Event] | None:
    if stopping is None:
        return await subscription.next(timeout_s)
    if stopping.is_set():
        raise StreamInterrupted(last)
    batch_task = asyncio.create_task(subscription.next(timeout_s))
    stop_task = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait({batch_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    if batch_task in done:
        return batch_task.result()
    batch_task.cancel()
    raise StreamInterrupted(last)


async def _read_all(sessions: SessionFactory, job_id: uuid.UUID, *, after: int) -> list[Event]:
    events: list[Event] = []
    async with sessions() as session:
        while True:
            page = await read_events(session, job_id, after=after, limit=REPLAY_PAGE)
            events.extend(page)
            if len(page) < REPLAY_PAGE:
                return events
            after = page[-1].seq
