"""The decoder-only transformer, in numpy, with a key/value cache.

Architecture (the same as :mod:`forgeline.training.model` trains): token
embeddings tied to the output layer, pre-norm blocks with RMSNorm, causal
multi-head attention with rotary position embeddings, and a GELU (tanh)
feed-forward layer four times as wide. Rotary positions make the cache a
sliding window: past the context length the oldest entries are dropped and
generation goes on, each token still seeing the last ``context`` tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a model; stored in the weights file's metadata."""

    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    context: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def to_json(self) -> str:
        """The configuration as JSON, for the weights metadata."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Parse :meth:`to_json` output."""
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


def tensor_names(config: ModelConfig) -> list[str]:
    """Every tensor a model of ``config`` has, as the weights file names them."""
    names = ["embed", "norm"]
    for i in range(config.n_layers):
        names += [f"layers.{i}.{part}" for part in ("norm1", "qkv", "proj", "norm2", "fc", "out")]
    return names


def rope_tables(config: ModelConfig, positions: npt.NDArray[np.int64]) -> tuple[Array, Array]:
    """Cosines and sines of the rotary angles at ``positions``: (len, head_dim / 2)."""
    half = config.head_dim // 2
    inv_freq = config.rope_base ** (-np.arange(half, dtype=np.float64) / half)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate (heads, len, head_dim) vectors by their positions' angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated: Array = np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated


def _rms_norm(x: Array, weight: Array, eps: float) -> Array:
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    out: Array = (x * scale * weight).astype(np.float32, copy=False)
    return out


def _gelu(x: Array) -> Array:
    # The tanh approximation, as torch's gelu(approximate="tanh").
    inner = np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)
    out = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))
    return out.astype(np.float32, copy=False)


class KVCache:
    """Keys and values of the tokens seen so far, for each layer."""

    def __init__(self, config: ModelConfig) -> None:
        shape = (config.n_layers, config.n_heads, config.context, config.head_dim)
        self.keys = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.length = 0  # entries filled (at most context)
        self.position = 0  # absolute position of the next token

    def make_room(self, count: int) -> None:
        """Drop the oldest entries so ``count`` more fit."""
        capacity = self.keys.shape[2]
        overflow = self.length + count - capacity
        if overflow > 0:
            keep = self.length - overflow
            self.keys[:, :, :keep] = self.keys[:, :, overflow : self.length]
            self.values[:, :, :keep] = self.values[:, :, overflow : self.length]
            self.length = keep


class TransformerLM:
    """Inference for one model; thread-safe, each generation has its own cache."""

    def __init__(self, config: ModelConfig, tensors: dict[str, Array]) -> None:
        missing = [n for n in tensor_names(config) if n not in tensors]
        if missing:
            raise ValueError(f"weights lack tensors: {', '.join(missing[:5])}")
        self.config = config
        self.w = tensors
        self._layers = [
            tuple(
                tensors[f"layers.{i}.{p}"] for p in ("norm1", "qkv", "proj", "norm2", "fc", "out")
            )
            for i in range(config.n_layers)
        ]
        self._embed_t = np.ascontiguousarray(tensors["embed"].T)

    def new_cache(self) -> KVCache:
        """An empty cache for one generation."""
        return KVCache(self.config)

    def forward(self, tokens: list[int], cache: KVCache) -> Array:
        """Logits (vocab,) for the token after ``tokens``, which extend ``cache``.

        ``tokens`` may be a whole prompt or a single new token; at most
        ``context`` of them at once.
        """
        c = self.config
        n = len(tokens)
        if not 0 < n <= c.context:
            raise ValueError(f"feed between 1 and {c.context} tokens at a time, not {n}")
        cache.make_room(n)
        positions = np.arange(cache.position, cache.position + n, dtype=np.int64)
        cos, sin = rope_tables(c, positions)
        x: Array = self.w["embed"][np.asarray(tokens)].astype(np.float32)
        start, stop = cache.length, cache.length + n
        # Within the new tokens, token i may see cached entries and new ones up to i.
        mask = np.triu(np.full((n, stop), -np.inf, dtype=np.float32), k=start + 1)
        scale = np.float32(1.0 / np.sqrt(c.head_dim))
        for layer, (norm1, qkv_w, proj, norm2, fc, out) in enumerate(self._layers):
            h = _rms_norm(x, norm1, c.norm_eps)
            qkv = (h @ qkv_w).reshape(n, 3, c.n_heads, c.head_dim).transpose(1, 2, 0, 3)
            q = apply_rope(qkv[0], cos, sin)
            cache.keys[layer, :, start:stop] = apply_rope(qkv[1], cos, sin)
            cache.values[layer, :, start:stop] = qkv[2]
            keys = cache.keys[layer, :, :stop]
            scores = (q @ keys.transpose(0, 2, 1)) * scale + mask
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            attended = (probs @ cache.values[layer, :, :stop]).transpose(1, 0, 2).reshape(n, -1)
            x = x + attended @ proj
            x = x + _gelu(_rms_norm(x, norm2, c.norm_eps) @ fc) @ out
        cache.length = stop
        cache.position += n
        last = _rms_norm(x[-1], self.w["norm"], c.norm_eps)
        logits: Array = last @ self._embed_t
        return logits

    def logits_for(self, tokens: list[int]) -> Array:
        """Logits (len, vocab) at every position of ``tokens`` (for tests and evaluation)."""
        cache = self.new_cache()
        return np.stack([self.forward([t], cache) for t in tokens])
