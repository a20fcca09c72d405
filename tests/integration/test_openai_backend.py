"""The OpenAI-compatible backend against a real HTTP model server speaking the protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from forgeline.backends.base import Delta, GenerationRequest, Usage
from forgeline.backends.openai_compat import OpenAICompatibleBackend
from forgeline.errors import BackendError, BackendUnavailableError
from tests.support.openai_server import OpenAIServer
from tests.support.processes import free_port

PIECES = ["Hel", "lo ", "wor", "ld."]
REQUEST = GenerationRequest(prompt="say hello", max_tokens=100)

BackendFactory = Callable[..., OpenAICompatibleBackend]


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    """A model server that always answers with PIECES."""
    with OpenAIServer(pieces=PIECES) as running:
        yield running


@pytest.fixture
async def make_backend(server: OpenAIServer) -> AsyncIterator[BackendFactory]:
    """Builds backends on ``server`` (no backoff between retries); closes them afterwards."""
    made: list[OpenAICompatibleBackend] = []

    def make(**overrides: object) -> OpenAICompatibleBackend:
        options: dict[str, object] = {
            "base_url": server.base_url,
            "model": server.model,
            "connect_timeout_s": 1.0,
            "timeout_s": 10.0,
            "max_retries": 2,
            "retry_backoff_s": 0.0,
            **overrides,
        }
        backend = OpenAICompatibleBackend(**options)  # type: ignore[arg-type]
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


async def collect(backend: OpenAICompatibleBackend, request: GenerationRequest) -> list[Delta]:
    """Every delta of one generation."""
    return [delta async for delta in backend.stream(request)]


async def test_stream_yields_the_pieces_in_order_then_usage(
    make_backend: BackendFactory, server: OpenAIServer
) -> None:
    """Streamed pieces arrive in order, followed by the server's token usage."""
    deltas = await collect(make_backend(), GenerationRequest(prompt="say hello", system="be kind"))

    assert [d.text for d in deltas if d.text] == PIECES
    assert [d.usage for d in deltas if d.usage] == [Usage(prompt_tokens=4, completion_tokens=4)]
    body = server.last_body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "say hello"},
    ]


@pytest.mark.parametrize(("api_key", "header"), [("sk-test", "Bearer sk-test"), (None, None)])
async def test_the_api_key_is_sent_only_when_set(
    make_backend: BackendFactory, server: OpenAIServer, api_key: str | None, header: str | None
) -> None:
    """A key goes as a bearer token; without one (local servers) no Authorization is sent."""
    await collect(make_backend(api_key=api_key), REQUEST)

    assert server.authorization == header


@pytest.mark.parametrize(
    ("request_", "text"),
    [
        pytest.param(GenerationRequest(prompt="p", max_tokens=2), "Hello ", id="max_tokens"),
        pytest.param(GenerationRequest(prompt="p", stop=("rld",)), "Hello wo", id="stop"),
    ],
)
async def test_max_tokens_and_stop_reach_the_server(
    make_backend: BackendFactory, request_: GenerationRequest, text: str
) -> None:
    """`max_tokens` and `stop` are sent, so the server ends the text where asked."""
    deltas = await collect(make_backend(), request_)

    assert "".join(d.text for d in deltas) == text


@pytest.mark.parametrize("status", [500, 429])
async def test_failures_before_the_first_token_are_retried(
    make_backend: BackendFactory, server: OpenAIServer, status: int
) -> None:
    """A 500 or 429 before any text is retried, up to max_retries, and then succeeds."""
    server.fail_next(2, status=status)

    deltas = await collect(make_backend(max_retries=2), REQUEST)

    assert "".join(d.text for d in deltas) == "".join(PIECES)
    assert server.request_count == 3


@pytest.mark.parametrize("status", [500, 429])
async def test_retries_give_up_with_backend_unavailable(
    make_backend: BackendFactory, server: OpenAIServer, status: int
) -> None:
    """Past max_retries, the failure is raised as a retryable BackendUnavailableError."""
    server.fail_next(3, status=status)

    with pytest.raises(BackendUnavailableError, match=str(status)) as raised:
        await collect(make_backend(max_retries=2), REQUEST)

    assert raised.value.retryable
    assert server.request_count == 3


@pytest.mark.parametrize("status", [400, 404])
async def test_client_errors_are_not_retried(
    make_backend: BackendFactory, server: OpenAIServer, status: int
) -> None:
    """A 400 or 404 raises a non-retryable BackendError after a single request."""
    server.fail_next(1, status=status)

    with pytest.raises(BackendError, match=f"answered {status}: failing on purpose") as raised:
        await collect(make_backend(max_retries=2), REQUEST)

    assert not isinstance(raised.value, BackendUnavailableError)
    assert not raised.value.retryable
    assert server.request_count == 1


async def test_a_connection_cut_mid_stream_is_raised_not_retried(
    make_backend: BackendFactory, server: OpenAIServer
) -> None:
    """A stream cut after some text raises BackendUnavailableError; no silent second request."""
    server.cut_after = 2
    stream = make_backend(max_retries=2).stream(REQUEST)

    received = [(await anext(stream)).text for _ in range(2)]
    with pytest.raises(BackendUnavailableError):
        await anext(stream)

    assert received == PIECES[:2]
    assert server.request_count == 1


async def test_an_unreachable_server_is_unavailable_and_named(
    make_backend: BackendFactory,
) -> None:
    """Nothing listening at the URL raises BackendUnavailableError naming that URL."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = make_backend(base_url=url, max_retries=0)

    with pytest.raises(BackendUnavailableError, match=url):
        await collect(backend, REQUEST)
    with pytest.raises(BackendUnavailableError, match=url):
        await backend.check()


async def test_check_reports_the_served_model(
    make_backend: BackendFactory, server: OpenAIServer
) -> None:
    """check() names the model and where it is served."""
    detail = await make_backend().check()

    assert server.model in detail
    assert server.base_url in detail


async def test_check_fails_when_the_model_is_not_served(
    make_backend: BackendFactory, server: OpenAIServer
) -> None:
    """check() for a model the server lacks raises BackendError naming both models."""
    with pytest.raises(BackendError, match="llama-none") as raised:
        await make_backend(model="llama-none").check()

    assert server.model in raised.value.message


async def test_concurrency_cap_holds_across_concurrent_streams(
    make_backend: BackendFactory, server: OpenAIServer
) -> None:
    """With max_concurrency=2, six concurrent streams never reach the server more than 2 at once."""
    server.piece_delay_s = 0.02
    backend = make_backend(max_concurrency=2)

    results = await asyncio.gather(*(collect(backend, REQUEST) for _ in range(6)))

    assert all("".join(d.text for d in deltas) == "".join(PIECES) for deltas in results)
    assert server.request_count == 6
    assert server.peak_streams == 2
