"""The backend interface every model server adapter implements."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerationRequest:
    """One text generation, in the terms every backend understands."""

    prompt: str
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.8
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    #: Sample only among this many likeliest tokens (None: backend default).
    top_k: int | None = None
    #: Sample only among the likeliest tokens making up this probability (None: all).
    top_p: float | None = None


@dataclass(frozen=True)
class Usage:
    """Token counts a backend reports for one generation."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """A piece of streamed output; the last one may carry the usage instead."""

    text: str
    usage: Usage | None = None


class Backend(abc.ABC):
    """A model server. Implementations translate their errors to ``BackendError``."""

    #: Short name used in metrics, logs and ``/readyz``.
    name: str

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Yield the generated text as it is produced.

        Raises ``BackendUnavailableError`` for failures worth retrying and
        ``BackendError`` for the rest.
        """

    @abc.abstractmethod
    async def check(self) -> str:
        """Verify the backend answers; return a short description of what it serves."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections."""
