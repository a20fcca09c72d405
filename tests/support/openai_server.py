"""A real OpenAI-compatible model server for tests and benchmarks.

It speaks the chat completions protocol over HTTP (streamed as server-sent
events, or in one JSON body) and lists its one model at ``GET /v1/models``,
so forgeline's backend runs against it exactly as against vLLM or Ollama.
Instead of a model it tells a deterministic story built from the prompt
(see :func:`story_pieces`), one word per token, at a chosen pace.

Its misbehaviours are the ones a production model server has: failing the
next requests with a status (500, 429), or closing the connection in the
middle of a stream. It records what it received and what it sent.

In a test, run it in a background thread::

    with OpenAIServer(piece_delay_s=0.01) as server:
        backend = OpenAICompatibleBackend(base_url=server.base_url, model=server.model)

For benchmarks, run it as its own process::

    python -m tests.support.openai_server --port 8100 --pieces-per-second 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

DEFAULT_MODEL = "forgeline-test-model"
#: Longest a stopping server waits for streams still running.
SHUTDOWN_GRACE_S = 1
#: Request bodies and replies kept for assertions; a long benchmark keeps only the latest.
RECORDED = 1000


def story_pieces(prompt: str) -> list[str]:
    """The story the server tells for ``prompt``: one piece (token) per word."""
    words = f"Once upon a time, {prompt.strip()} And that was the whole story.".split()
    return [f"{word} " for word in words[:-1]] + words[-1:]


class _ConnectionCut(Exception):
    """Raised inside a stream to drop the connection without finishing the body."""


class OpenAIServer:
    """An OpenAI-compatible chat completions server (on 127.0.0.1 unless told otherwise).

    Behaviour (may be changed while it runs):

    - ``pieces``: the text pieces every reply is made of; ``None`` tells
      :func:`story_pieces` of the last user message.
    - ``piece_delay_s``: wait before each piece (1 / tokens per second).
    - ``fail_next(count, status)``: answer the next ``count`` completion
      requests with ``status`` and an OpenAI error body.
    - ``cut_after``: close the connection after this many pieces, mid-stream.

    Records: ``request_count`` and ``requests`` (completion request bodies,
    failed ones included), ``authorization`` (the latest one's header),
    ``replies`` (the text of each reply sent, whole or cut),
    ``active_streams`` and ``peak_streams`` (replies being sent at once).
    Only the latest :data:`RECORDED` bodies and replies are kept.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = DEFAULT_MODEL,
        pieces: Sequence[str] | None = None,
        piece_delay_s: float = 0.0,
        fail_first: int = 0,
        fail_status: int = 500,
        cut_after: int | None = None,
    ) -> None:
        self.model = model
        self.pieces = list(pieces) if pieces is not None else None
        self.piece_delay_s = piece_delay_s
        self.cut_after = cut_after
        self.requests: deque[dict[str, Any]] = deque(maxlen=RECORDED)
        self.replies: deque[str] = deque(maxlen=RECORDED)
        self.request_count = 0
        self.authorization: str | None = None
        self.active_streams = 0
        self.peak_streams = 0
        self._failures_left = fail_first
        self._fail_status = fail_status
        self._lock = threading.Lock()
        # Bound now, so the port is known (and held) before the server starts.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- what tests read ------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client (ends in ``/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def last_body(self) -> dict[str, Any]:
        """The body of the latest completion request."""
        return self.requests[-1]

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next ``count`` completion requests with ``status``."""
        with self._lock:
            self._failures_left = count
            self._fail_status = status

    # -- running ----------------------------------------------------------------
    def _uvicorn(self, *, log_config: Any) -> uvicorn.Server:
        config = uvicorn.Config(
            _QuietCut(self._app()),
            log_config=log_config,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
        return uvicorn.Server(config)

    def start(self, timeout_s: float = 10.0) -> OpenAIServer:
        """Serve from a background thread; return once it accepts connections."""
        self._server = self._uvicorn(log_config=None)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name=f"openai-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the test model server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and free the port; streams still running get a moment to end."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"the test model server on port {self.port} did not stop")
        self._socket.close()

    def run_forever(self) -> None:
        """Serve in the calling thread until SIGINT or SIGTERM."""
        self._uvicorn(log_config=uvicorn.config.LOGGING_CONFIG).run(sockets=[self._socket])

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the protocol -------------------------------------------------------------
    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
            ]
        )

    async def _models(self, request: Request) -> Response:
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "forgeline"}
        return JSONResponse({"object": "list", "data": [model]})

    async def _chat_completions(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        self.requests.append(body)
        self.authorization = request.headers.get("authorization")
        self.request_count += 1
        with self._lock:
            failing = self._failures_left > 0
            if failing:
                self._failures_left -= 1
            status = self._fail_status
        if failing:
            return _error(status, f"failing on purpose with {status}", "server_error")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' must be a non-empty list", param="messages")
        if body.get("model") != self.model:
            return _error(
                404, f"The model `{body.get('model')}` does not exist", code="model_not_found"
            )
        pieces, finish_reason = self._reply_pieces(body, messages)
        # Words stand in for tokens, both ways.
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        }
        reply = _Reply(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), self.model)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = self._events(reply, pieces, finish_reason, usage if include_usage else None)
            return StreamingResponse(events, media_type="text/event-stream")
        await asyncio.sleep(self.piece_delay_s * len(pieces))
        self.replies.append("".join(pieces))
        return JSONResponse(reply.whole("".join(pieces), finish_reason, usage))

    def _reply_pieces(
        self, body: dict[str, Any], messages: list[dict[str, Any]]
    ) -> tuple[list[str], str]:
        """The pieces to send, cut by ``max_tokens`` and ``stop``, and why they end."""
        if self.pieces is not None:
            pieces = list(self.pieces)
        else:
            prompts = [m for m in messages if m.get("role") == "user"] or messages
            pieces = story_pieces(str(prompts[-1].get("content", "")))
        finish_reason = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and limit < len(pieces):
            pieces, finish_reason = pieces[:limit], "length"
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        text = "".join(pieces)
        found = [text.find(stop) for stop in stops if stop and stop in text]
        if found:
            # The stop sequence and everything after it are not sent.
            end, offset, kept = min(found), 0, []
            for piece in pieces:
                if offset >= end:
                    break
                kept.append(piece[: end - offset])
                offset += len(piece)
            pieces, finish_reason = kept, "stop"
        return pieces, finish_reason

    async def _events(
        self,
        reply: _Reply,
        pieces: list[str],
        finish_reason: str,
        usage: dict[str, int] | None,
    ) -> AsyncIterator[bytes]:
        self.active_streams += 1
        self.peak_streams = max(self.peak_streams, self.active_streams)
        sent: list[str] = []
        with_usage = usage is not None
        try:
            yield _event(reply.chunk({"role": "assistant", "content": ""}, None, with_usage))
            for piece in pieces:
                if self.cut_after is not None and len(sent) >= self.cut_after:
                    raise _ConnectionCut
                await asyncio.sleep(self.piece_delay_s)
                yield _event(reply.chunk({"content": piece}, None, with_usage))
                sent.append(piece)
            if self.cut_after is not None and len(sent) >= self.cut_after:
                raise _ConnectionCut
            yield _event(reply.chunk({}, finish_reason, with_usage))
            if usage is not None:
                yield _event({**reply.chunk({}, None, True), "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
        finally:
            self.active_streams -= 1
            self.replies.append("".join(sent))


class _Reply:
    """The fixed fields of one completion, and its chunks in OpenAI's format."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.id = completion_id
        self.created = created
        self.model = model

    def chunk(
        self, delta: dict[str, str], finish_reason: str | None, with_usage: bool
    ) -> dict[str, Any]:
        """A ``chat.completion.chunk``; ``usage`` is null on each when usage is asked for."""
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if with_usage:
            chunk["usage"] = None
        return chunk

    def whole(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        """A non-streamed ``chat.completion``."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }


class _QuietCut:
    """Ends the ASGI call quietly when a stream is cut on purpose.

    The server then sees a response that never completed and closes the
    connection, which is what a crashing model server looks like to a client.
    """

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except _ConnectionCut:
            return


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape: forgeline's backend quotes its ``message``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tests.support.openai_server``: serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--pieces-per-second", type=float, default=0.0, help="pace of each stream; 0: no wait"
    )
    parser.add_argument("--text", help="reply with these words instead of the story")
    parser.add_argument("--fail-first", type=int, default=0, help="requests to fail first")
    parser.add_argument("--fail-status", type=int, default=500)
    parser.add_argument("--cut-after", type=int, help="close streams after this many pieces")
    args = parser.parse_args(argv)
    pieces = None
    if args.text is not None:
        words = args.text.split()
        pieces = [f"{word} " for word in words[:-1]] + words[-1:]
    server = OpenAIServer(
        host=args.host,
        port=args.port,
        model=args.model,
        pieces=pieces,
        piece_delay_s=1 / args.pieces_per_second if args.pieces_per_second > 0 else 0.0,
        fail_first=args.fail_first,
        fail_status=args.fail_status,
        cut_after=args.cut_after,
    )
    print(f"serving {server.model} at {server.base_url}", flush=True)
    server.run_forever()


if __name__ == "__main__":
    main()
