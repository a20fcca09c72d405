"""The OpenAI-compatible protocol without a server: requests, streamed chunks, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from unittest import mock

import aiohttp
import pytest

from forgeline.backends.base import Delta, GenerationRequest, Usage
from forgeline.backends.openai_compat import (
    _completion_body,
    _lines,
    _parse_chunk,
    _sse_data,
    _status_error,
)
from forgeline.errors import BackendError, BackendUnavailableError

URL = "http://model:8080/v1"


async def _given(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def test_sse_data_joins_multiline_data_and_skips_comments() -> None:
    """Each event's data lines become one string; comments and other fields are ignored."""
    events = [
        data
        async for data in _sse_data(
            _given(": keep-alive", "", "data: one", "", "event: x", "data: a", "data: b", "")
        )
    ]
    assert events == ["one", "a\nb"]


async def test_body_lines_are_whole_however_the_bytes_arrive() -> None:
    """Lines split across reads, CRLF endings, a character cut in two, a line over 64 KiB."""
    reader = aiohttp.StreamReader(
        mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop()
    )
    long_line = "data: " + "x" * 100_000
    pieces = [b"data: h", b"\xc3", b"\xa9llo\r\n", b"\r\n", long_line.encode(), b"\n", b"tail"]
    for piece in pieces:
        reader.feed_data(piece)
    reader.feed_eof()

    assert [line async for line in _lines(reader)] == ["data: h\u00e9llo", "", long_line, "tail"]


def test_chunks_yield_usage_then_content() -> None:
    """A chunk with usage and text gives the usage first, then the text of each choice."""
    chunk = (
        '{"choices": [{"delta": {"content": "Hi"}}, {"delta": {}}],'
        ' "usage": {"prompt_tokens": 3, "completion_tokens": 5}}'
    )
    assert _parse_chunk(chunk, URL) == [Delta("", Usage(3, 5)), Delta("Hi")]


def test_an_error_chunk_raises_with_the_server_message() -> None:
    """A server that reports an error inside the stream fails the generation, naming it."""
    with pytest.raises(BackendError, match="model overloaded"):
        _parse_chunk('{"error": {"message": "model overloaded"}}', URL)


@pytest.mark.parametrize("data", ["not json", "[1, 2]", '{"usage": {"prompt_tokens": 1}}'])
def test_a_malformed_chunk_is_a_backend_error(data: str) -> None:
    """Garbage from the server is reported as the server's fault, quoting it."""
    with pytest.raises(BackendError, match="malformed chunk"):
        _parse_chunk(data, URL)


def test_the_request_body_leaves_unset_options_out() -> None:
    """Options the request leaves unset are not sent, so the server's defaults apply."""
    body = _completion_body("m", GenerationRequest(prompt="hi", max_tokens=7, temperature=0.5))

    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 7,
        "temperature": 0.5,
    }


def test_the_request_body_carries_every_option_set() -> None:
    """System prompt, seed, stop, top_p and top_k (vLLM's and Ollama's extension) are sent."""
    request = GenerationRequest(
        prompt="hi", system="be brief", seed=3, stop=("\n",), top_p=0.9, top_k=40
    )

    body = _completion_body("m", request)

    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert (body["seed"], body["stop"], body["top_p"], body["top_k"]) == (3, ["\n"], 0.9, 40)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        pytest.param('{"error": {"message": "no such model"}}', "no such model", id="openai"),
        pytest.param('{"error": "no such model"}', "no such model", id="flat"),
        pytest.param("<h1>Bad Gateway</h1>", "<h1>Bad Gateway</h1>", id="html"),
    ],
)
def test_an_error_status_quotes_the_server(body: str, detail: str) -> None:
    """An error answer names the URL, the status and the server's own message."""
    error = _status_error(404, body, URL)

    assert error.message == f"the model server at {URL} answered 404: {detail}"


def test_an_error_body_is_shortened() -> None:
    """A long error page is cut, so it cannot flood a job's error or the logs."""
    error = _status_error(400, "x" * 10_000, URL)

    assert len(error.message) < 600


@pytest.mark.parametrize(("status", "retryable"), [(429, True), (503, True), (400, False)])
def test_only_rate_limits_and_server_trouble_are_retryable(status: int, retryable: bool) -> None:
    """429 and 5xx become BackendUnavailableError (retried); other statuses are final."""
    error = _status_error(status, "", URL)

    assert isinstance(error, BackendUnavailableError) is retryable
    assert error.retryable is retryable
    assert error.message == f"the model server at {URL} answered {status}"
