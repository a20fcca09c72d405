"""Writing one running attempt's events, with token deltas batched.

A fast backend produces hundreds of deltas a second; writing each as a row
would cost a transaction and a notification apiece. Deltas are gathered and
flushed at most every ``flush_interval_s`` (sooner past ``max_batch_chars``),
and any other event first flushes the tokens before it, so order holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from types import TracebackType
from typing import Any

from forgeline.db.engine import SessionFactory
from forgeline.events.log import append_events
from forgeline.events.models import EventType


class EventEmitter:
    """Appends events for one job; use as an async context manager."""

    def __init__(
        self,
        sessions: SessionFactory,
        job_id: uuid.UUID,
        *,
        flush_interval_s: float = 0.05,
        max_batch_chars: int = 4096,
    ) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.flush_interval_s = flush_interval_s
        self.max_batch_chars = max_batch_chars
        self._pending: list[str] = []
        self._pending_chars = 0
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventEmitter:
        self._flusher = asyncio.create_task(self._flush_periodically(), name="event-flusher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        # Even when cancelled, what was generated is kept (partial output).
        await asyncio.shield(self.flush())

    async def token(self, text: str) -> None:
        """Queue generated text; it is written within ``flush_interval_s``."""
        if not text:
            return
        self._pending.append(text)
        self._pending_chars += len(text)
        if self._pending_chars >= self.max_batch_chars:
            await self.flush()
        else:
            self._dirty.set()

    async def emit(self, kind: EventType, data: dict[str, Any]) -> None:
        """Write an event now, after any tokens queued before it."""
        await self.flush(extra=[(kind, data)])

    async def flush(self, extra: list[tuple[EventType, dict[str, Any]]] | None = None) -> None:
        """Write queued tokens (and ``extra`` events) in one transaction."""
        async with self._lock:
            events: list[tuple[EventType, dict[str, Any]]] = []
            if self._pending:
                events.append((EventType.TOKEN, {"text": "".join(self._pending)}))
                self._pending.clear()
                self._pending_chars = 0
            events.extend(extra or ())
            if not events:
                return
            async with self.sessions.begin() as session:
                await append_events(session, self.job_id, events)

    async def _flush_periodically(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.flush_interval_s)
            self._dirty.clear()
            await self.flush()
