"""Reading forgeline's event streams in tests: raw SSE over httpx, and a transcript.

The parser is fed one line at a time, so a test can cut a connection after
any line (in the middle of an event, too) and see only the events that
arrived whole, as a browser's ``EventSource`` would. A :class:`Transcript`
gathers what one client received across reconnects and fails the moment a
sequence number repeats or skips.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass, field
from typing import Any

import httpx

#: Event types the server sends that are not entries of the job's log.
CONTROL_EVENTS = frozenset({"reconnect"})


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event: ``seq`` is its ``id`` (``None`` for control events)."""

    seq: int | None
    type: str
    data: dict[str, Any]


class SseParser:
    """Turns lines of a ``text/event-stream`` into events; remembers the comments."""

    def __init__(self) -> None:
        self.comments: list[str] = []
        self._fields: dict[str, str] = {}
        self._data: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        """Take one line (without its end); the event it completes, if any."""
        if not line:
            event = None
            if self._data:
                seq = self._fields.get("id")
                event = SseEvent(
                    int(seq) if seq else None,
                    self._fields.get("event", "message"),
                    json.loads("\n".join(self._data)),
                )
            self._fields, self._data = {}, []
            return event
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        else:
            self._fields[name] = value
        return None


def events_url(base_url: str, job_id: str) -> str:
    """The SSE endpoint of a job."""
    return f"{base_url}/api/v1/jobs/{job_id}/events"


def stream_headers(last_event_id: int | None) -> dict[str, str]:
    """Request headers of an SSE client resuming after ``last_event_id``."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return headers


def read_events(
    client: httpx.Client,
    url: str,
    *,
    last_event_id: int | None = None,
    max_lines: int | None = None,
    parser: SseParser | None = None,
) -> Generator[SseEvent, None, None]:
    """Events of one connection; it is dropped after ``max_lines`` lines, or when left.

    Raises ``AssertionError`` unless the server answers 200 with an event stream.
    """
    parser = parser or SseParser()
    with client.stream("GET", url, headers=stream_headers(last_event_id)) as response:
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"stream answered {response.status_code}: {response.text}")
        if not response.headers["content-type"].startswith("text/event-stream"):
            raise AssertionError(f"not an event stream: {response.headers['content-type']}")
        if max_lines == 0:
            return
        for count, line in enumerate(response.iter_lines(), start=1):
            event = parser.feed(line)
            if event is not None:
                yield event
            if max_lines is not None and count >= max_lines:
                return


async def aread_events(
    client: httpx.AsyncClient,
    url: str,
    *,
    last_event_id: int | None = None,
    parser: SseParser | None = None,
) -> AsyncGenerator[SseEvent, None]:
    """Events of one connection, for asyncio tests following many streams at once."""
    parser = parser or SseParser()
    async with client.stream("GET", url, headers=stream_headers(last_event_id)) as response:
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"stream answered {response.status_code}: {response.text}")
        async for line in response.aiter_lines():
            event = parser.feed(line)
            if event is not None:
                yield event


@dataclass
class Transcript:
    """What one client received from a job's log, across any number of connections."""

    events: list[SseEvent] = field(default_factory=list)
    connections: int = 0

    @property
    def last_seq(self) -> int:
        """The sequence number to resume after (0 before the first event)."""
        return (self.events[-1].seq or 0) if self.events else 0

    @property
    def final(self) -> SseEvent | None:
        """The final event, once received."""
        if self.events and self.events[-1].type == "final":
            return self.events[-1]
        return None

    def add(self, event: SseEvent) -> None:
        """Record a log event; fail on a gap or a duplicate, or on anything after the final."""
        if self.final is not None:
            raise AssertionError(f"event after the final one: {event}")
        if event.seq != self.last_seq + 1:
            kind = "duplicate" if event.seq is not None and event.seq <= self.last_seq else "gap"
            raise AssertionError(f"{kind}: event {event.seq} after {self.last_seq}")
        self.events.append(event)

    @property
    def seqs(self) -> list[int]:
        """Sequence numbers received, in order."""
        return [event.seq or 0 for event in self.events]

    def of_type(self, kind: str) -> list[SseEvent]:
        """The received events of one type."""
        return [event for event in self.events if event.type == kind]

    def text(self) -> str:
        """The generated text of the latest attempt (an ``attempt`` event starts over)."""
        parts: list[str] = []
        for event in self.events:
            if event.type == "attempt":
                parts.clear()
            elif event.type == "token":
                parts.append(event.data["text"])
        return "".join(parts)

    def all_text(self) -> str:
        """Every token text received, across attempts."""
        return "".join(event.data["text"] for event in self.of_type("token"))
