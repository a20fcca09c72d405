"""The ``transformers`` backend: a Hugging Face causal language model on disk.

Any folder that ``AutoModelForCausalLM.from_pretrained`` reads (config,
weights, tokenizer) works, on the CPU or a CUDA GPU. Nothing is downloaded:
loading passes ``local_files_only``. Needs the ``[local]`` extra (torch and
transformers), imported only when this backend is built.

Generation is a token loop over the model's key/value cache rather than
``model.generate``: each request samples with its own seeded random
generator (so seeds reproduce under concurrency), stop sequences end the
loop, and a client that goes away stops the computing. Each step runs in a
worker thread, so the event loop stays free; at most ``max_concurrency``
generations compute at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgeline.backends.base import Backend, Delta, GenerationRequest, Usage
from forgeline.errors import BackendError, ConfigurationError, ModelFileError
from forgeline.lm.generate import Sampling, StopFilter, choose

try:
    import torch
    import transformers
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        "FORGELINE_BACKEND=transformers needs the [local] extra: "
        "pip install 'forgeline[local]' (torch and transformers)"
    ) from exc


@dataclass(frozen=True)
class LocalModel:
    """A loaded model, its tokenizer and where it runs."""

    model: Any
    tokenizer: Any
    device: torch.device
    eos_ids: frozenset[int]
    load_s: float


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU when CUDA has one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("FORGELINE_LOCAL_DEVICE: cuda asked for, but torch sees no GPU")
    return torch.device(device)


def load_local_model(path: Path, device: str = "auto") -> LocalModel:
    """Load the model folder at ``path``; :class:`ModelFileError` names it on failure."""
    started = time.perf_counter()
    if not (path / "config.json").is_file():
        raise ModelFileError(f"not a model folder (no config.json): {path}")
    target = resolve_device(device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype="auto"
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFileError(f"cannot load the model in {path}: {exc}") from None
    model = model.to(target).eval()
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    return LocalModel(model, tokenizer, target, eos_ids, time.perf_counter() - started)


class LocalGeneration:
    """One generation: the prompt's forward pass, then one token per :meth:`step`."""

    def __init__(self, loaded: LocalModel, request: GenerationRequest, sampling: Sampling) -> None:
        self._loaded = loaded
        self._sampling = sampling
        self._rng = np.random.default_rng(sampling.seed)
        self._stop = StopFilter(request.stop)
        prompt = (
            request.prompt if request.system is None else f"{request.system}\n\n{request.prompt}"
        )
        ids: list[int] = loaded.tokenizer(prompt)["input_ids"] or [next(iter(loaded.eos_ids), 0)]
        self.prompt_tokens = len(ids)
        self.completion_tokens = 0
        self.max_tokens = request.max_tokens
        self.finished = request.max_tokens <= 0
        self._input = torch.tensor([ids], device=loaded.device)
        self._past: Any = None
        self._generated: list[int] = []
        # Incremental detokenising: decode a short window, emit what it added.
        self._prefix_at = self._read_at = 0

    @torch.inference_mode()
    def step(self) -> str:
        """Compute one token; return the text it completes (may be empty)."""
        if self.finished:
            return ""
        out = self._loaded.model(input_ids=self._input, past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        logits = out.logits[0, -1].float().cpu().numpy()
        token = choose(logits, self._sampling, self._rng)
        self.completion_tokens += 1
        self._input = torch.tensor([[token]], device=self._loaded.device)
        if token in self._loaded.eos_ids:
            self.finished = True
            return self._stop.finish()
        self._generated.append(token)
        text = self._stop.push(self._decode_new())
        if self._stop.stopped:
            self.finished = True
        elif self.completion_tokens >= self.max_tokens:
            self.finished = True
            text += self._stop.finish()
        return text

    def _decode_new(self) -> str:
        decode = self._loaded.tokenizer.decode
        before = decode(self._generated[self._prefix_at : self._read_at], skip_special_tokens=True)
        after = decode(self._generated[self._prefix_at :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix_at, self._read_at = self._read_at, len(self._generated)
            return str(after[len(before) :])
        return ""


class TransformersBackend(Backend):
    """Streams from a local Hugging Face causal language model."""

    def __init__(
        self,
        *,
        model_path: Path,
        device: str = "auto",
        max_concurrency: int = 4,
        name: str = "transformers",
    ) -> None:
        self.name = name
        self.model_path = model_path
        self.device = device
        self.max_concurrency = max_concurrency
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix=f"forgeline-{name}"
        )
        self._slots: asyncio.Semaphore | None = None
        self._loading: asyncio.Lock | None = None
        self._loaded: LocalModel | None = None

    async def model(self) -> LocalModel:
        """The loaded model, loading it (in a thread) on first use."""
        if self._loaded is None:
            if self._loading is None:
                self._loading = asyncio.Lock()
            async with self._loading:
                if self._loaded is None:
                    self._loaded = await asyncio.to_thread(
                        load_local_model, self.model_path, self.device
                    )
        return self._loaded

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        loaded = await self.model()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        try:
            sampling = Sampling(request.temperature, request.top_k, request.top_p, request.seed)
        except ValueError as exc:
            raise BackendError(f"invalid sampling settings: {exc}") from None
        loop = asyncio.get_running_loop()
        async with self._slots:
            generation = await loop.run_in_executor(
                self._executor, LocalGeneration, loaded, request, sampling
            )
            while not generation.finished:
                try:
                    text = await loop.run_in_executor(self._executor, generation.step)
                except (RuntimeError, ValueError) as exc:  # torch reports failures as these
                    raise BackendError(f"the model in {self.model_path} failed: {exc}") from None
                if text:
                    yield Delta(text)
        yield Delta("", Usage(generation.prompt_tokens, generation.completion_tokens))

    async def check(self) -> str:
        loaded = await self.model()
        return f"{self.model_path} on {loaded.device}"

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
