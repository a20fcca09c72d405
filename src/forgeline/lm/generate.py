"""Token-by-token text generation: sampling, stop sequences and limits.

:class:`Generation` is synchronous and does one model step per call to
:meth:`Generation.step`, so a caller decides where steps run (the built-in
backend runs them in worker threads) and can stream each piece of text as
soon as its token exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forgeline.lm.model import Array, TransformerLM
from forgeline.lm.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature`` 0 means always the likeliest."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be at least 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def choose(logits: Array, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token id, drawn from ``logits`` as ``sampling`` says."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    candidates = np.arange(scaled.size)
    if sampling.top_k is not None and sampling.top_k < scaled.size:
        candidates = np.argpartition(-scaled, sampling.top_k - 1)[: sampling.top_k]
    # Most likely first; a stable sort keeps ties in id order, so seeds reproduce.
    candidates = candidates[np.argsort(-scaled[candidates], kind="stable")]
    probs = np.exp(scaled[candidates] - scaled[candidates[0]])
    probs /= probs.sum()
    if sampling.top_p is not None and sampling.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
        probs = probs[:keep] / probs[:keep].sum()
        candidates = candidates[:keep]
    index = int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"))
    return int(candidates[min(index, candidates.size - 1)])


class StopFilter:
    """Passes streamed text on, ending it before the first stop sequence.

    Text that could be the start of a stop sequence is held back until the
    next piece shows whether it is one, so a stop sequence never reaches the
    client even when it spans several tokens.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of ``text`` (with what was held) that is safe to send."""
        if self.stopped:
            return ""
        if not self._stop:
            return text
        held = self._held + text
        cut = min((at for at in (held.find(s) for s in self._stop) if at >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return held[:cut]
        keep = _longest_stop_prefix(held, self._stop)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def finish(self) -> str:
        """Whatever was held back, now that no more text comes."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class Generation:
    """One generation in progress: feed the prompt, then one token per step."""

    def __init__(
        self,
        model: TransformerLM,
        tokenizer: Tokenizer,
        prompt: str,
        *,
        max_tokens: int,
        sampling: Sampling,
        stop: tuple[str, ...] = (),
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._sampling = sampling
        self._rng = np.random.default_rng(sampling.seed)
        self._decoder = StreamDecoder(tokenizer)
        self._stop = StopFilter(stop)
        self._cache = model.new_cache()
        context = model.config.context
        ids = tokenizer.encode(prompt) or [tokenizer.end_of_text]
        # Keep the prompt's end and leave room to generate within the window.
        self._pending = ids[-(context // 2) :]
        self.prompt_tokens = len(ids)
        self.completion_tokens = 0
        self.max_tokens = max_tokens
        self.finished = max_tokens <= 0

    def step(self) -> str:
        """Compute one token; return the text it completes (often one word piece).

        The text may be empty (half a character, or held back as a possible
        stop sequence); after the last step, :attr:`finished` is true.
        """
        if self.finished:
            return ""
        logits = self._model.forward(self._pending, self._cache)
        token = choose(logits, self._sampling, self._rng)
        self.completion_tokens += 1
        self._pending = [token]
        if token == self._tokenizer.end_of_text:
            text = self._decoder.flush()
            self.finished = True
        else:
            text = self._decoder.push(token)
            if self.completion_tokens >= self.max_tokens:
                text += self._decoder.flush()
                self.finished = True
        out = self._stop.push(text)
        if self._stop.stopped:
            self.finished = True
        elif self.finished:
            out += self._stop.finish()
        return out


def _longest_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop sequence."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best
