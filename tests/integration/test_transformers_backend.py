"""The transformers backend on a tiny, randomly initialised GPT-2 built by the test.

Needs the [local] extra (torch, transformers); scripts/ml-deps installs it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from forgeline.backends.base import Delta, GenerationRequest
from forgeline.backends.transformers_local import TransformersBackend
from forgeline.errors import ModelFileError
from forgeline.runtime import build_backends
from forgeline.settings import get_settings
from tests.support.tiny_models import random_hf_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random GPT-2 folder, made once for this module."""
    return random_hf_model(tmp_path_factory.mktemp("gpt2"))


async def collect(backend: TransformersBackend, request: GenerationRequest) -> list[Delta]:
    """Every delta of one generation."""
    return [delta async for delta in backend.stream(request)]


def text_of(deltas: list[Delta]) -> str:
    """The generated text."""
    return "".join(d.text for d in deltas)


async def test_streams_text_and_reports_usage(model_path: Path) -> None:
    """A generation yields text pieces, then usage with the token counts."""
    backend = TransformersBackend(model_path=model_path, device="cpu")

    deltas = await collect(backend, GenerationRequest(prompt="The sea", max_tokens=12, seed=3))
    usage = deltas[-1].usage
    assert text_of(deltas)
    assert usage is not None
    assert 1 <= usage.completion_tokens <= 12
    assert usage.prompt_tokens > 0
    await backend.aclose()


async def test_same_seed_gives_the_same_text_even_concurrently(model_path: Path) -> None:
    """Seeds reproduce, also when other generations run at the same time."""
    backend = TransformersBackend(model_path=model_path, device="cpu", max_concurrency=3)
    request = GenerationRequest(prompt="The sea", max_tokens=25, temperature=1.0, seed=42)
    other = GenerationRequest(prompt="The sea", max_tokens=25, temperature=1.0, seed=43)

    alone = text_of(await collect(backend, request))
    together = await asyncio.gather(
        collect(backend, request), collect(backend, other), collect(backend, request)
    )
    assert text_of(together[0]) == alone == text_of(together[2])
    assert text_of(together[1]) != alone


async def test_stop_sequence_and_max_tokens_hold(model_path: Path) -> None:
    """A stop sequence cuts the text before it; max tokens caps the count."""
    backend = TransformersBackend(model_path=model_path, device="cpu")
    request = GenerationRequest(prompt="a", max_tokens=60, temperature=1.0, seed=9)
    full = text_of(await collect(backend, request))
    stop = full[len(full) // 2 : len(full) // 2 + 2]

    stopped = text_of(
        await collect(backend, GenerationRequest(**{**request.__dict__, "stop": (stop,)}))
    )
    short = await collect(backend, GenerationRequest(**{**request.__dict__, "max_tokens": 5}))
    assert stop not in stopped
    assert full.startswith(stopped)
    assert short[-1].usage is not None
    assert short[-1].usage.completion_tokens <= 5


async def test_generation_does_not_block_the_event_loop(model_path: Path) -> None:
    """Tokens are computed in worker threads: the loop turns between them, and the
    first piece arrives before the last token is computed."""
    backend = TransformersBackend(model_path=model_path, device="cpu")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    stream = backend.stream(GenerationRequest(prompt="The sea", max_tokens=60, seed=4))
    first = await anext(aiter(stream))
    ticks_at_first = ticks
    rest = [d async for d in stream]
    ticking.cancel()

    usage = rest[-1].usage
    assert first.text
    assert usage is not None
    assert usage.completion_tokens > 10
    assert ticks > ticks_at_first + usage.completion_tokens // 2


@pytest.mark.parametrize("cap", [1, 2])
async def test_concurrency_cap(model_path: Path, cap: int) -> None:
    """Three generations at once run at most ``cap`` model steps in parallel."""
    backend = TransformersBackend(model_path=model_path, device="cpu", max_concurrency=cap)
    loaded = await backend.model()
    call = type(loaded.model).__call__
    lock = threading.Lock()
    inside = peak = 0

    def tracking_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.003)  # widen the window in which steps could overlap
        try:
            return call(self, *args, **kwargs)
        finally:
            with lock:
                inside -= 1

    original = loaded.model.__class__
    subclass = type("Tracked", (original,), {"__call__": tracking_call})
    loaded.model.__class__ = subclass
    try:
        requests = [GenerationRequest(prompt="a", max_tokens=8, seed=s) for s in range(3)]
        await asyncio.gather(*(collect(backend, r) for r in requests))
    finally:
        loaded.model.__class__ = original
    assert peak == cap


async def test_missing_model_folder_is_named(tmp_path: Path) -> None:
    """A folder that holds no model fails with an error naming it."""
    backend = TransformersBackend(model_path=tmp_path / "nothing", device="cpu")

    with pytest.raises(ModelFileError, match=re.escape(str(tmp_path / "nothing"))):
        await collect(backend, GenerationRequest(prompt="x"))


async def test_settings_select_the_transformers_backend(model_path: Path) -> None:
    """FORGELINE_BACKEND=transformers builds this backend, and only it."""
    settings = get_settings(backend="transformers", local_model_path=model_path, local_device="cpu")

    backends = build_backends(settings)
    description = await backends["transformers"].check()
    await backends["transformers"].aclose()
    assert list(backends) == ["transformers"]
    assert str(model_path) in description
