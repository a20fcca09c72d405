"""The built-in backend: streaming, seeds, limits and clear errors about its files."""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from forgeline.backends.base import Delta, GenerationRequest
from forgeline.backends.builtin import (
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    BuiltinBackend,
    load_model,
)
from forgeline.errors import ModelFileError
from forgeline.lm.model import Array, KVCache
from tests.support.tiny_models import random_numpy_model


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A randomly initialised model on disk."""
    return random_numpy_model(tmp_path / "model")


async def collect(backend: BuiltinBackend, request: GenerationRequest) -> list[Delta]:
    """Every delta of one generation."""
    return [delta async for delta in backend.stream(request)]


def text_of(deltas: list[Delta]) -> str:
    """The generated text."""
    return "".join(d.text for d in deltas)


async def test_same_seed_gives_the_same_text(model_dir: Path) -> None:
    """Two generations with one seed match; another seed gives other text."""
    backend = BuiltinBackend(model_dir=model_dir)
    request = GenerationRequest(prompt="The sea", max_tokens=40, temperature=1.0, seed=11)

    first = text_of(await collect(backend, request))
    again = text_of(await collect(backend, request))
    other = text_of(await collect(backend, GenerationRequest(**{**request.__dict__, "seed": 12})))
    assert first == again
    assert first != other


async def test_max_tokens_holds_and_usage_counts_tokens(model_dir: Path) -> None:
    """No more tokens than asked for are generated, and the usage says how many."""
    backend = BuiltinBackend(model_dir=model_dir)

    deltas = await collect(backend, GenerationRequest(prompt="x", max_tokens=7, seed=1))
    usage = deltas[-1].usage
    assert usage is not None
    assert 1 <= usage.completion_tokens <= 7
    assert usage.prompt_tokens > 0


async def test_stop_sequence_ends_the_text_before_it(model_dir: Path) -> None:
    """Generation stops at the first stop sequence, which is not sent."""
    backend = BuiltinBackend(model_dir=model_dir)
    request = GenerationRequest(prompt="The sea", max_tokens=200, temperature=1.0, seed=5)
    full = text_of(await collect(backend, request))
    # Stop on a piece of text the unstopped run produced, well inside it.
    stop = full[len(full) // 2 : len(full) // 2 + 2]

    stopped = text_of(
        await collect(backend, GenerationRequest(**{**request.__dict__, "stop": (stop,)}))
    )
    assert stop not in stopped
    assert full.startswith(stopped)
    assert len(stopped) <= len(full) // 2


async def test_tokens_stream_while_the_rest_is_still_to_compute(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first text arrives after a few model steps, not after all of them,
    and the event loop keeps running while tokens are computed."""
    backend = BuiltinBackend(model_dir=model_dir)
    loaded = await backend.model()
    steps = 0
    forward = loaded.model.forward

    def counting_forward(tokens: list[int], cache: KVCache) -> Array:
        nonlocal steps
        steps += 1
        return forward(tokens, cache)

    monkeypatch.setattr(loaded.model, "forward", counting_forward)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    stream = backend.stream(GenerationRequest(prompt="The sea", max_tokens=300, seed=2))
    first = await anext(aiter(stream))
    steps_at_first = steps
    async for _ in stream:
        pass
    ticking.cancel()

    assert first.text
    assert steps >= 20
    assert steps_at_first < 5
    assert ticks >= steps  # the loop turned while each step computed


@pytest.mark.parametrize("cap", [1, 2])
async def test_concurrency_cap_limits_generations_computing_at_once(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, cap: int
) -> None:
    """Three generations at once compute at most ``cap`` model steps in parallel."""
    backend = BuiltinBackend(model_dir=model_dir, max_concurrency=cap)
    loaded = await backend.model()
    forward = loaded.model.forward
    lock = threading.Lock()
    inside = peak = 0

    def tracking_forward(tokens: list[int], cache: KVCache) -> Array:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.002)  # widen the window in which steps could overlap
        try:
            return forward(tokens, cache)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(loaded.model, "forward", tracking_forward)
    requests = [GenerationRequest(prompt="a", max_tokens=15, seed=s) for s in range(3)]

    await asyncio.gather(*(collect(backend, r) for r in requests))
    assert peak == cap


async def test_missing_weights_file_is_named(model_dir: Path) -> None:
    """A model folder without its weights fails with an error naming the file."""
    (model_dir / WEIGHTS_FILE).unlink()

    with pytest.raises(ModelFileError, match=re.escape(str(model_dir / WEIGHTS_FILE))):
        await collect(BuiltinBackend(model_dir=model_dir), GenerationRequest(prompt="x"))


@pytest.mark.parametrize("name", [WEIGHTS_FILE, TOKENIZER_FILE])
def test_corrupt_model_file_is_named(model_dir: Path, name: str) -> None:
    """A truncated weights or tokenizer file fails with an error naming that file."""
    path = model_dir / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(ModelFileError, match=re.escape(str(path))):
        load_model(model_dir)


def test_tokenizer_of_another_model_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """Weights and tokenizer of different vocabularies are not silently combined."""
    other = random_numpy_model(tmp_path / "other", vocab_size=280)
    shutil.copy(other / TOKENIZER_FILE, model_dir / TOKENIZER_FILE)

    with pytest.raises(ModelFileError, match="expect"):
        load_model(model_dir)
