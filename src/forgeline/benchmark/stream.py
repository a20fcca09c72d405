"""One job's event stream as the benchmark reads it: SSE decoding and what it records.

Tokens are counted as the whitespace-separated words of the text the stream
carried (the last attempt's, when a job was retried): the API does not expose
the model's own token count, and words are the unit the test model server
and ``bench/streaming.py`` count too.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from forgeline.benchmark.stats import JobSample, Outcome
from forgeline.client import StreamEvent


class SseDecoder:
    """Turns the lines of a ``text/event-stream`` into events, one line at a time."""

    def __init__(self) -> None:
        self._fields: dict[str, str] = {}
        self._data: list[str] = []

    def feed(self, line: str) -> StreamEvent | None:
        """Take one line (without its end); return the event it completes, if any."""
        if not line:
            event = None
            if self._data:
                seq = int(self._fields.get("id") or 0)
                data = json.loads("\n".join(self._data))
                event = StreamEvent(seq, self._fields.get("event", "message"), data)
            self._fields, self._data = {}, []
            return event
        if line.startswith(":"):
            return None  # a heartbeat comment
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        else:
            self._fields[name] = value
        return None


class JobWatch:
    """What the benchmark learns about one job as it goes."""

    def __init__(self, index: int, origin: float) -> None:
        self.index = index
        self.origin = origin
        self.sent = time.perf_counter()
        self.job_id: str | None = None
        self.submit_s: float | None = None
        self.first_token: float | None = None
        self.final_at: float | None = None
        self.attempts = 0
        self.errors_seen = 0
        self.parts: list[str] = []
        self.created_at: float | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def see(self, event: StreamEvent, at: float) -> dict[str, Any] | None:
        """Record one stream event; return the final event's data when it is one."""
        if event.type == "token":
            if self.first_token is None:
                self.first_token = at
            self.parts.append(str(event.data.get("text", "")))
        elif event.type == "attempt":
            self.attempts = int(event.data.get("attempt", self.attempts + 1))
            if self.attempts > 1:
                self.parts.clear()  # a new delivery starts the text over
        elif event.type == "error":
            self.errors_seen += 1
        elif event.type == "final":
            self.final_at = at
            return event.data
        return None

    def record_job(self, job: dict[str, Any]) -> None:
        """Keep the job's own timestamps, as the API reports them."""
        self.created_at = _epoch(job.get("created_at"))
        self.started_at = _epoch(job.get("started_at"))
        self.finished_at = _epoch(job.get("finished_at"))

    def sample(
        self, outcome: Outcome, code: str | None = None, message: str | None = None
    ) -> JobSample:
        """The job's record, as it stands now."""
        queue_wait = None
        if self.created_at is not None and self.started_at is not None:
            queue_wait = max(0.0, self.started_at - self.created_at)
        return JobSample(
            index=self.index,
            outcome=outcome,
            job_id=self.job_id,
            error_code=code,
            error_message=message,
            sent_at_s=self.sent - self.origin,
            ended_at_s=time.perf_counter() - self.origin,
            submit_s=self.submit_s,
            queue_wait_s=queue_wait,
            ttft_s=None if self.first_token is None else self.first_token - self.sent,
            generation_s=None if self.final_at is None else self.final_at - self.sent,
            tokens=len("".join(self.parts).split()),
            attempts=self.attempts,
            errors_seen=self.errors_seen,
            started_at=self.started_at,
            finished_at=self.finished_at,
        )


def _epoch(value: object) -> float | None:
    """Seconds since the epoch from an ISO 8601 timestamp, or ``None``."""
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
