"""The built-in backend: forgeline's own small model, run with numpy in-process.

It needs no server, no API key and no download: the weights ship inside the
package (``forgeline/models/story``). The model is a small demonstration
model trained on Jane Austen's novels (see its ``MODEL_CARD.md``); point
forgeline at a real model server for real work.

Each token is one numpy step run in a worker thread, so the event loop keeps
serving while the CPU works, and at most ``max_concurrency`` generations
compute at once. The model loads on first use, once per process.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from forgeline.backends.base import Backend, Delta, GenerationRequest, Usage
from forgeline.errors import BackendError, ModelFileError
from forgeline.lm.generate import Generation, Sampling
from forgeline.lm.model import ModelConfig, TransformerLM
from forgeline.lm.tokenizer import Tokenizer
from forgeline.lm.weights import WeightsFormatError, load_weights

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
#: Sample among this many likeliest tokens when a request names no top-k: a
#: small model's long tail of unlikely tokens is mostly noise.
DEFAULT_TOP_K = 40


def shipped_model_dir() -> Path:
    """The folder of the model that ships with forgeline."""
    return Path(str(resources.files("forgeline") / "models" / "story"))


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to generate, and what it was loaded from."""

    model: TransformerLM
    tokenizer: Tokenizer
    directory: Path
    load_s: float

    @property
    def parameters(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return sum(int(w.size) for w in self.model.w.values())


def load_model(directory: Path) -> LoadedModel:
    """Load ``model.safetensors`` and ``tokenizer.json`` from ``directory``.

    Raises :class:`ModelFileError` naming the file that is missing or damaged.
    """
    started = time.perf_counter()
    weights_path = directory / WEIGHTS_FILE
    tokenizer_path = directory / TOKENIZER_FILE
    for path in (weights_path, tokenizer_path):
        if not path.is_file():
            raise ModelFileError(f"model file missing: {path}")
    try:
        tensors, metadata = load_weights(weights_path)
        config = ModelConfig.from_json(metadata["config"])
        model = TransformerLM(config, tensors)
    except (WeightsFormatError, KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(
            f"model weights file is damaged or not a model: {weights_path} ({exc})"
        ) from None
    except OSError as exc:
        raise ModelFileError(f"cannot read model weights {weights_path}: {exc}") from None
    try:
        tokenizer = Tokenizer.load(tokenizer_path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"tokenizer file is damaged: {tokenizer_path} ({exc})") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise ModelFileError(
            f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but the weights "
            f"{weights_path} expect {config.vocab_size}"
        )
    return LoadedModel(model, tokenizer, directory, time.perf_counter() - started)


class BuiltinBackend(Backend):
    """Generates with the shipped model (or another exported by ``forgeline train``)."""

    def __init__(
        self,
        *,
        model_dir: Path | None = None,
        max_concurrency: int = 8,
        default_top_k: int | None = DEFAULT_TOP_K,
        name: str = "builtin",
    ) -> None:
        self.name = name
        self.model_dir = model_dir or shipped_model_dir()
        self.default_top_k = default_top_k
        self.max_concurrency = max_concurrency
        self._slots: asyncio.Semaphore | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix=f"forgeline-{name}"
        )
        self._loaded: LoadedModel | None = None
        self._loading: asyncio.Lock | None = None

    async def model(self) -> LoadedModel:
        """The loaded model, loading it (in a thread) on first use."""
        if self._loaded is None:
            if self._loading is None:
                self._loading = asyncio.Lock()
            async with self._loading:
                if self._loaded is None:
                    self._loaded = await asyncio.to_thread(load_model, self.model_dir)
        return self._loaded

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        loaded = await self.model()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        try:
            sampling = Sampling(
                temperature=request.temperature,
                top_k=request.top_k if request.top_k is not None else self.default_top_k,
                top_p=request.top_p,
                seed=request.seed,
            )
        except ValueError as exc:
            raise BackendError(f"invalid sampling settings: {exc}") from None
        loop = asyncio.get_running_loop()
        async with self._slots:
            generation = await loop.run_in_executor(
                self._executor, self._start, loaded, request, sampling
            )
            while not generation.finished:
                text = await loop.run_in_executor(self._executor, generation.step)
                if text:
                    yield Delta(text)
        yield Delta("", Usage(generation.prompt_tokens, generation.completion_tokens))

    @staticmethod
    def _start(loaded: LoadedModel, request: GenerationRequest, sampling: Sampling) -> Generation:
        # A continuation model: it follows on from the prompt, so the prompt
        # ends with a paragraph break and the text starts a new paragraph.
        return Generation(
            loaded.model,
            loaded.tokenizer,
            request.prompt.rstrip() + "\n\n",
            max_tokens=request.max_tokens,
            sampling=sampling,
            stop=request.stop,
        )

    async def check(self) -> str:
        loaded = await self.model()
        return f"built-in model ({loaded.parameters:,} parameters) from {loaded.directory}"

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, object]:
        """Facts about the loaded model, for logs and benchmarks."""
        if self._loaded is None:
            return {"model_dir": str(self.model_dir), "loaded": False}
        return {
            "model_dir": str(self.model_dir),
            "loaded": True,
            "parameters": self._loaded.parameters,
            "load_s": self._loaded.load_s,
            "config": json.loads(self._loaded.model.config.to_json()),
        }
