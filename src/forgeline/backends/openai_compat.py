"""A backend for any OpenAI-compatible server, on the official ``openai`` SDK.

vLLM, Ollama, llama.cpp's server, TGI, OpenAI itself and Gemini's
OpenAI-compatible endpoint all speak the chat completions protocol, so one
adapter serves them all. Requests are capped per process, and retried only
before the first token: once text has streamed to a client, a silent retry
would produce a different story, so the job's own retry (announced to
clients) takes over instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai

from forgeline.backends.base import Backend, Delta, GenerationRequest, Usage
from forgeline.errors import BackendError, BackendUnavailableError

#: Status codes worth retrying: rate limited, or the server's own trouble.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class OpenAICompatibleBackend(Backend):
    """Streams chat completions from an OpenAI-compatible server."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        name: str = "openai",
        connect_timeout_s: float = 5.0,
        timeout_s: float = 120.0,
        max_concurrency: int = 16,
        max_retries: int = 2,
        retry_backoff_s: float = 0.5,
    ) -> None:
        self.name = name
        self.base_url = base_url
        self.model = model
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._slots = asyncio.Semaphore(max_concurrency)
        # The SDK's own retries would also fire mid-stream; ours are explicit.
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            # Local servers ignore the key, but the SDK insists on one.
            api_key=api_key or "not-needed",
            timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            max_retries=0,
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        async with self._slots, contextlib.AsyncExitStack() as stack:
            response = await self._open_with_retries(stack, request)
            try:
                async for data in _sse_data(response.iter_lines()):
                    if data == "[DONE]":
                        return
                    for delta in _parse_chunk(data, self.base_url):
                        yield delta
            except httpx2.HTTPError as exc:
                raise BackendUnavailableError(
                    f"the model server at {self.base_url} broke off the stream: {exc}"
                ) from None

    async def _open_with_retries(
        self, stack: contextlib.AsyncExitStack, request: GenerationRequest
    ) -> Any:
        """The streaming response, opened; the SDK raises for error statuses."""
        messages: list[dict[str, str]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        attempt = 0
        while True:
            try:
                # The raw stream: the SDK's typed chunks cost more CPU than the
                # whole rest of a token's way to the client.
                return await stack.enter_async_context(
                    self._client.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
                        model=self.model,
                        messages=messages,
                        stream=True,
                        stream_options={"include_usage": True},
                        max_tokens=request.max_tokens,
                        temperature=request.temperature,
                        seed=request.seed,
                        stop=list(request.stop) or None,
                        top_p=openai.NOT_GIVEN if request.top_p is None else request.top_p,
                        # top_k is not in OpenAI's API; vLLM and Ollama read it here.
                        extra_body={"top_k": request.top_k} if request.top_k else None,
                    )
                )
            except openai.OpenAIError as exc:
                error = _translate(exc, self.base_url)
                if not error.retryable or attempt >= self.max_retries:
                    raise error from None
            attempt += 1
            # Full jitter keeps many workers from retrying in lockstep.
            await asyncio.sleep(random.uniform(0, self.retry_backoff_s * 2**attempt))  # noqa: S311

    async def check(self) -> str:
        try:
            models = await self._client.models.list()
        except openai.OpenAIError as exc:
            raise _translate(exc, self.base_url) from None
        names = [model.id for model in models.data]
        if names and self.model not in names:
            raise BackendError(
                f"{self.base_url} does not serve model {self.model!r} "
                f"(it serves: {', '.join(names[:10])})"
            )
        return f"{self.model} at {self.base_url}"

    async def aclose(self) -> None:
        await self._client.close()


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined by newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data.clear()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def _parse_chunk(data: str, base_url: str) -> list[Delta]:
    """The deltas in one chat completion chunk, usage first when it carries any."""
    try:
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise TypeError("not an object")
        if error := chunk.get("error"):
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise BackendError(f"the model server at {base_url} failed mid-stream: {message}")
        deltas: list[Delta] = []
        if usage := chunk.get("usage"):
            deltas.append(Delta("", Usage(usage["prompt_tokens"], usage["completion_tokens"])))
        for choice in chunk.get("choices") or ():
            if content := (choice.get("delta") or {}).get("content"):
                deltas.append(Delta(content))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BackendError(
            f"the model server at {base_url} sent a malformed chunk ({exc}): {data[:200]!r}"
        ) from None
    return deltas


def _translate(exc: openai.OpenAIError, base_url: str) -> BackendError:
    """Map an SDK error onto forgeline's errors, keeping the server's words."""
    if isinstance(exc, openai.APITimeoutError):
        return BackendUnavailableError(f"the model server at {base_url} timed out")
    if isinstance(exc, openai.APIConnectionError):
        return BackendUnavailableError(f"the model server at {base_url} is unreachable")
    if isinstance(exc, openai.APIStatusError):
        message = f"the model server at {base_url} answered {exc.status_code}: {exc.message}"
        if exc.status_code in RETRYABLE_STATUS:
            return BackendUnavailableError(message)
        return BackendError(message)
    return BackendError(f"the model server at {base_url} failed: {exc}")
