"""One LISTEN connection per API process, fanned out to in-process subscribers.

Notifications only carry news; the table is the truth. A subscriber that
sees a gap in sequence numbers, or whose queue overflowed, or any subscriber
after the LISTEN connection was re-established, reads the table again from
its last sequence number. So a lost notification delays an event, never
loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator

import psycopg
import structlog

from forgeline.events.log import CHANNEL, REVOKED_CHANNEL
from forgeline.events.models import Event, EventType

logger = structlog.get_logger("forgeline.events")


class Subscription:
    """What one stream hears about one job: batches of events, or "re-read"."""

    def __init__(self, job_id: uuid.UUID, *, max_batches: int = 256) -> None:
        self.job_id = job_id
        self.max_batches = max_batches
        #: Set when the server is shutting down: the stream should end now.
        self.interrupted = False
        self._batches: deque[list[Event] | None] = deque()
        self._ready = asyncio.Event()

    def push(self, events: list[Event] | None) -> None:
        """Deliver a batch; ``None`` means "read the table, you may have missed some"."""
        if len(self._batches) >= self.max_batches:
            # A slow reader: drop what is queued and have it catch up from the table.
            self._batches.clear()
            events = None
        self._batches.append(events)
        self._ready.set()

    def interrupt(self) -> None:
        """Wake the reader and tell it the server is shutting down."""
        self.interrupted = True
        self._ready.set()

    async def next(self, timeout_s: float) -> list[Event] | None:
        """The next batch; ``None`` to re-read (also after ``timeout_s`` of silence)."""
        if not self._batches and not self.interrupted:
            # A timer, not wait_for: no task per wait, which adds up over
            # hundreds of streams each woken many times a second.
            self._ready.clear()
            timer = asyncio.get_running_loop().call_later(timeout_s, self._ready.set)
            try:
                await self._ready.wait()
            finally:
                timer.cancel()
        return self._batches.popleft() if self._batches else None


class EventHub:
    """Listens on ``forgeline_events`` and wakes the subscribers of each job."""

    def __init__(
        self,
        conninfo: str,
        *,
        reconnect_delay_s: float = 1.0,
        on_key_revoked: Callable[[str], None] | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.on_key_revoked = on_key_revoked
        self.reconnect_delay_s = reconnect_delay_s
        self._subscriptions: dict[uuid.UUID, set[Subscription]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.notifications = 0
        self.interrupted = False

    @property
    def subscriber_count(self) -> int:
        """Streams currently following a job in this process."""
        return sum(len(subs) for subs in self._subscriptions.values())

    def start(self) -> None:
        """Begin listening in the background."""
        self._task = asyncio.create_task(self._listen_forever(), name="event-hub")

    async def stop(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def subscribe(self, job_id: uuid.UUID) -> Iterator[Subscription]:
        """Hear about ``job_id`` for the duration of the ``with`` block."""
        subscription = Subscription(job_id)
        if self.interrupted:
            subscription.interrupt()
        self._subscriptions[job_id].add(subscription)
        try:
            yield subscription
        finally:
            subscribers = self._subscriptions[job_id]
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscriptions[job_id]

    def interrupt_streams(self) -> None:
        """Shutdown: every stream, current or new, ends with its position."""
        self.interrupted = True
        for subscribers in self._subscriptions.values():
            for subscription in subscribers:
                subscription.interrupt()

    async def _listen_forever(self) -> None:
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
                async with connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    await connection.execute(f"LISTEN {REVOKED_CHANNEL}")
                    self.connected.set()
                    # Anything may have happened while we were not listening.
                    self._wake_all()
                    async for notification in connection.notifies():
                        if notification.channel == REVOKED_CHANNEL:
                            if self.on_key_revoked is not None:
                                self.on_key_revoked(notification.payload)
                            continue
                        self.notifications += 1
                        self._dispatch(notification.payload)
            except (psycopg.Error, OSError) as exc:
                self.connected.clear()
                logger.warning("event listener lost", action="listen_lost", error=str(exc))
                await asyncio.sleep(self.reconnect_delay_s)

    def _wake_all(self) -> None:
        for subscribers in self._subscriptions.values():
            for subscription in subscribers:
                subscription.push(None)

    def _dispatch(self, payload: str) -> None:
        try:
            entries = json.loads(payload)
            parsed = [(uuid.UUID(entry["job"]), entry.get("events")) for entry in entries]
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("bad event notification", action="bad_notification")
            return
        for job_id, items in parsed:
            subscribers = self._subscriptions.get(job_id)
            if not subscribers:
                continue
            events: list[Event] | None = None
            if items is not None:
                events = [
                    Event(item["seq"], EventType(item["type"]), item["data"]) for item in items
                ]
            for subscription in subscribers:
                subscription.push(events)
