"""In-memory fakes of forgeline's adapter interfaces, for tests of code above them.

They behave like the real adapters at the interface (same errors, same
streaming shape) without any I/O. Integration tests use the real ones.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from forgeline.backends.base import Backend, Delta, GenerationRequest, Usage
from forgeline.errors import BackendError, NotFoundError
from forgeline.storage import Storage


class FakeBackend(Backend):
    """Streams a fixed list of text pieces, optionally failing first.

    ``fail_with`` errors are raised, one per call, before the first piece;
    then generations succeed. ``delay_s`` is waited between pieces.
    """

    def __init__(
        self,
        pieces: Sequence[str] = ("Once ", "upon ", "a ", "time."),
        *,
        delay_s: float = 0.0,
        fail_with: Sequence[BackendError] = (),
        name: str = "fake",
    ) -> None:
        self.name = name
        self.pieces = list(pieces)
        self.delay_s = delay_s
        self._failures = list(fail_with)
        self.requests: list[GenerationRequest] = []

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        if self._failures:
            raise self._failures.pop(0)
        emitted = 0
        for piece in self.pieces[: request.max_tokens]:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            emitted += 1
            yield Delta(piece)
        yield Delta("", Usage(prompt_tokens=len(request.prompt.split()), completion_tokens=emitted))

    async def check(self) -> str:
        return f"fake backend ({len(self.pieces)} pieces)"


class MemoryStorage(Storage):
    """Objects in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.writes = 0

    async def put(self, key: str, data: bytes) -> None:
        self.writes += 1
        self.objects[key] = bytes(data)

    async def open(self, key: str) -> AsyncIterator[bytes]:
        try:
            data = self.objects[key]
        except KeyError:
            raise NotFoundError(f"no object {key}") from None
        yield data

    async def check(self) -> str:
        return "memory"


@dataclass
class MemoryRecorder:
    """A ``JobRecorder`` that keeps what a pipeline reported."""

    progress: list[float] = field(default_factory=list)
    artifacts: dict[str, tuple[str, int, str]] = field(default_factory=dict)

    async def set_progress(self, job_id: uuid.UUID, fraction: float) -> None:
        self.progress.append(fraction)

    async def record_artifact(
        self, job_id: uuid.UUID, name: str, key: str, size: int, content_type: str
    ) -> None:
        self.artifacts[name] = (key, size, content_type)
