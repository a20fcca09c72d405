"""Writing running jobs' events, with token deltas batched across jobs.

A fast backend produces hundreds of deltas a second per job; writing each
as a row would cost a transaction and a notification apiece, and even one
transaction per job per flush does not scale to hundreds of concurrent
streams. So each worker process has one ``EventWriter``: every job's
``EventEmitter`` queues its deltas there, and the writer flushes all jobs
together, at most every ``flush_interval_s``, in one transaction with a few
notifications. The first delta after a quiet spell is written at once, so
a stream's first token does not wait for a tick. Progress is queued the same
way, and the job's row takes the fraction in the same transaction. Any other
event first flushes the tokens queued before it, so order holds, and returns
only once it is committed.

A failed flush loses that flush's events for the jobs in it; each of their
emitters then raises the error on its next call, so the attempt fails and
is retried, announced to clients by an ``attempt`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from types import TracebackType
from typing import Any

import structlog

from forgeline.db.engine import SessionFactory
from forgeline.events.log import EventSpec, append_many, set_progress_many
from forgeline.events.models import EventType

logger = structlog.get_logger("forgeline.events")


class EventEmitter:
    """One running attempt's events; use as an async context manager."""

    def __init__(self, writer: EventWriter, job_id: uuid.UUID) -> None:
        self.writer = writer
        self.job_id = job_id
        self._tokens: list[str] = []
        self._token_chars = 0
        self._events: list[EventSpec] = []
        self._fraction: float | None = None
        self._error: BaseException | None = None

    async def __aenter__(self) -> EventEmitter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Even when cancelled, what was generated is kept (partial output).
        await asyncio.shield(self.flush())

    async def token(self, text: str) -> None:
        """Queue generated text; it is written within the writer's interval."""
        self._raise_if_failed()
        if not text:
            return
        self._tokens.append(text)
        self._token_chars += len(text)
        if self._token_chars >= self.writer.max_batch_chars:
            await self.flush()
        else:
            self.writer.mark_dirty(self)

    async def progress(self, fraction: float) -> None:
        """Queue a progress event; it is written, and stored on the job, with the next batch."""
        self._raise_if_failed()
        self._take_tokens()
        self._events.append((EventType.PROGRESS, {"fraction": round(fraction, 4)}))
        self._fraction = fraction
        self.writer.mark_dirty(self)

    async def emit(self, kind: EventType, data: dict[str, Any]) -> None:
        """Write an event now, after any tokens queued before it."""
        self._raise_if_failed()
        self._take_tokens()
        self._events.append((kind, data))
        await self.flush()

    async def flush(self) -> None:
        """Write everything queued; raise if it (or an earlier flush) failed."""
        if self._tokens or self._events:
            self.writer.mark_dirty(self)
            # Shielded: a cancelled job still gets its output so far written.
            await asyncio.shield(self.writer.flush())
        self._raise_if_failed()

    # -- used by the writer ---------------------------------------------------
    def take(self) -> list[EventSpec]:
        """Hand over what is queued, tokens merged into one event."""
        self._take_tokens()
        events, self._events = self._events, []
        return events

    def take_progress(self) -> float | None:
        """The latest progress queued since the last call, if any."""
        fraction, self._fraction = self._fraction, None
        return fraction

    def failed(self, error: BaseException) -> None:
        """A flush carrying this emitter's events failed."""
        self._error = error

    def _take_tokens(self) -> None:
        if self._tokens:
            self._events.append((EventType.TOKEN, {"text": "".join(self._tokens)}))
            self._tokens.clear()
            self._token_chars = 0

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


class EventWriter:
    """Flushes the queued events of every job in this process together."""

    def __init__(
        self,
        sessions: SessionFactory,
        *,
        flush_interval_s: float = 0.05,
        max_batch_chars: int = 4096,
    ) -> None:
        self.sessions = sessions
        self.flush_interval_s = flush_interval_s
        self.max_batch_chars = max_batch_chars
        self._dirty: dict[EventEmitter, None] = {}  # insertion-ordered set
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._last_flush = 0.0
        self._task: asyncio.Task[None] | None = None

    def emitter(self, job_id: uuid.UUID) -> EventEmitter:
        """An emitter for one attempt of ``job_id``."""
        return EventEmitter(self, job_id)

    def mark_dirty(self, emitter: EventEmitter) -> None:
        """``emitter`` has events to write."""
        self._dirty[emitter] = None
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush_periodically(), name="event-writer")
        self._wake.set()

    async def flush(self) -> None:
        """Write every job's queued events in one transaction."""
        async with self._lock:
            emitters, self._dirty = self._dirty, {}
            self._last_flush = asyncio.get_running_loop().time()
            batches: dict[uuid.UUID, list[EventSpec]] = {}
            writers: dict[uuid.UUID, list[EventEmitter]] = {}
            progress: dict[uuid.UUID, float] = {}
            for emitter in emitters:
                if events := emitter.take():
                    batches.setdefault(emitter.job_id, []).extend(events)
                    writers.setdefault(emitter.job_id, []).append(emitter)
                if (fraction := emitter.take_progress()) is not None:
                    progress[emitter.job_id] = fraction
            if not batches:
                return
            error: Exception | None = None
            try:
                async with self.sessions.begin() as session:
                    written = await append_many(session, batches)
                    if progress:
                        await set_progress_many(session, progress)
            except Exception as exc:
                logger.warning("event flush failed", action="event_flush_failed", jobs=len(batches))
                written, error = {}, exc
            for job_id in batches.keys() - written.keys():
                for emitter in writers[job_id]:
                    emitter.failed(error or LookupError(f"no job {job_id}"))

    async def close(self) -> None:
        """Write what is left and stop the background flusher."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _flush_periodically(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            # After a quiet spell, write at once; under load, once per interval.
            delay = self._last_flush + self.flush_interval_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # Shielded: stopping mid-write still finishes the write.
            await asyncio.shield(self.flush())
