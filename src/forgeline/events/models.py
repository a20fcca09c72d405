"""Event records: what a job's stream carries."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class EventType(enum.StrEnum):
    """Kinds of event in a job's log."""

    STATUS = "status"  # {"status": "queued" | "running"}
    ATTEMPT = "attempt"  # {"attempt": n}: a delivery starts; clients reset their view
    TOKEN = "token"  # noqa: S105 - {"text": "..."}: generated text, batched
    PROGRESS = "progress"  # {"fraction": 0.4}
    ARTIFACT = "artifact"  # {"name", "size", "content_type", "url"}
    LOG = "log"  # {"level", "message"}
    ERROR = "error"  # {"code", "message", "retryable"}: an attempt failed
    FINAL = "final"  # {"status", "result"?, "error"?}: the last event, written once


@dataclass(frozen=True)
class Event:
    """One entry of a job's log; ``seq`` counts from 1 per job, without gaps."""

    seq: int
    type: EventType
    data: dict[str, Any]

    @property
    def is_final(self) -> bool:
        """True for the job's terminal event."""
        return self.type is EventType.FINAL

    def as_json(self) -> dict[str, Any]:
        """The event as clients receive it."""
        return {"seq": self.seq, "type": self.type.value, "data": self.data}
