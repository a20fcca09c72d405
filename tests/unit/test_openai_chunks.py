"""Parsing the raw chat completion stream of an OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from forgeline.backends.base import Delta, Usage
from forgeline.backends.openai_compat import _parse_chunk, _sse_data
from forgeline.errors import BackendError

URL = "http://model:8080/v1"


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def test_sse_data_joins_multiline_data_and_skips_comments() -> None:
    """Each event's data lines become one string; comments and other fields are ignored."""
    events = [
        data
        async for data in _sse_data(
            _lines(": keep-alive", "", "data: one", "", "event: x", "data: a", "data: b", "")
        )
    ]
    assert events == ["one", "a\nb"]


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
