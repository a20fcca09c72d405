"""A backend for any OpenAI-compatible server, spoken over plain aiohttp.

vLLM, Ollama, llama.cpp's server, TGI, OpenAI itself and Gemini's
OpenAI-compatible endpoint all speak the chat completions protocol, so one
adapter serves them all. Requests are capped per process, and retried only
before the first token: once text has streamed to a client, a silent retry
would produce a different story, so the job's own retry (announced to
clients) takes over instead.

Two endpoints are all it takes (``POST chat/completions`` streamed as
server-sent events, ``GET models``), so there is no SDK: the official one
weighed more than the rest of the HTTP stack, and its typed chunks cost more
CPU than a token's whole way to the client. The client is aiohttp rather
than httpx: a worker reads every token of every stream it runs, and
aiohttp's C parser does that for about a third of httpx's CPU (42 against
150 microseconds a chunk, 128 paced streams on one core).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from forgeline import __version__
from forgeline.backends.base import Backend, Delta, GenerationRequest, Usage
from forgeline.errors import BackendError, BackendUnavailableError

#: Status codes worth retrying: rate limited, or the server's own trouble.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
#: Most characters of an error body quoted in a message.
ERROR_BODY_CHARS = 500


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
        headers = {"User-Agent": f"forgeline/{__version__}"}
        if api_key:  # local servers need none
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers = headers
        # Relative paths keep base_url's own path (``.../v1`` + ``/chat/completions``).
        self._base = base_url.rstrip("/") + "/"
        # sock_read bounds the silence between two reads, as a read timeout does.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        """The HTTP session, made on first use (aiohttp wants a running loop).

        The semaphore caps the streams; the session only keeps their
        connections alive between them. Proxy variables and SSL_CERT_FILE
        are honoured, as for any other client of the machine.
        """
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=0),
                trust_env=True,
            )
        return self._session

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        async with self._slots:
            response = await self._open_with_retries(request)
            try:
                async for data in _sse_data(_lines(response.content)):
                    if data == "[DONE]":
                        return
                    for delta in _parse_chunk(data, self.base_url):
                        yield delta
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise BackendUnavailableError(
                    f"the model server at {self.base_url} broke off the stream: "
                    f"{exc or type(exc).__name__}"
                ) from None
            finally:
                # Back to the pool if the body was read to its end, else closed.
                response.release()

    async def _open_with_retries(self, request: GenerationRequest) -> aiohttp.ClientResponse:
        """The streaming response, its status checked; the caller releases it."""
        body = _completion_body(self.model, request)
        attempt = 0
        while True:
            try:
                return await self._send("POST", "chat/completions", body)
            except BackendError as error:
                if not error.retryable or attempt >= self.max_retries:
                    raise
            attempt += 1
            # Full jitter keeps many workers from retrying in lockstep.
            await asyncio.sleep(random.uniform(0, self.retry_backoff_s * 2**attempt))  # noqa: S311

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> aiohttp.ClientResponse:
        """One request, its body left to read; failures and error statuses are ``BackendError``."""
        try:
            response = await self._client().request(method, self._base + path, json=body)
        except TimeoutError:
            message = f"the model server at {self.base_url} timed out"
            raise BackendUnavailableError(message) from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailableError(
                f"the model server at {self.base_url} is unreachable ({type(exc).__name__})"
            ) from None
        if 200 <= response.status < 300:
            return response
        try:
            text = (await response.read()).decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError):
            text = ""  # the status alone says enough
        finally:
            response.release()
        raise _status_error(response.status, text, self.base_url)

    async def check(self) -> str:
        response = await self._send("GET", "models")
        try:
            text = (await response.read()).decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnavailableError(
                f"the model server at {self.base_url} broke off its model list ({exc})"
            ) from None
        finally:
            response.release()
        try:
            names = [str(model["id"]) for model in json.loads(text)["data"]]
        except (ValueError, TypeError, KeyError) as exc:
            raise BackendError(
                f"the model server at {self.base_url} sent a malformed model list ({exc}): "
                f"{text[:200]!r}"
            ) from None
        if names and self.model not in names:
            raise BackendError(
                f"{self.base_url} does not serve model {self.model!r} "
                f"(it serves: {', '.join(names[:10])})"
            )
        return f"{self.model} at {self.base_url}"

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _completion_body(model: str, request: GenerationRequest) -> dict[str, Any]:
    """The chat completions request for ``request``; options left unset are left out."""
    messages: list[dict[str, str]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": request.prompt})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
    }
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = list(request.stop)
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.top_k:
        # top_k is not in OpenAI's API; vLLM and Ollama read it here.
        body["top_k"] = request.top_k
    return body


async def _lines(body: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The body's lines without their endings (LF or CRLF), however long.

    Split as bytes, then decoded: a newline byte never occurs inside a
    UTF-8 character, so no character is cut.
    """
    pending = b""
    async for chunk in body.iter_any():
        pending += chunk
        if b"\n" not in chunk:
            continue  # a line still arriving: nothing to split yet
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode(errors="replace")
    if pending:
        yield pending.removesuffix(b"\r").decode(errors="replace")


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


def _status_error(status: int, body: str, base_url: str) -> BackendError:
    """Map an error status onto forgeline's errors, keeping the server's words.

    OpenAI-style servers put them in ``{"error": {"message": ...}}``; others
    answer plain text or HTML, quoted as it is, shortened.
    """
    detail = body.strip()
    with contextlib.suppress(ValueError, TypeError, KeyError):
        error = json.loads(detail)["error"]
        detail = str(error["message"] if isinstance(error, dict) else error)
    message = f"the model server at {base_url} answered {status}"
    if detail:
        message += f": {detail[:ERROR_BODY_CHARS]}"
    if status in RETRYABLE_STATUS:
        return BackendUnavailableError(message)
    return BackendError(message)
