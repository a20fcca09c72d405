"""The transformer in torch, for training; :mod:`forgeline.lm.model` runs it in numpy.

The two must compute the same function: the export test compares their
logits. Linear layers carry no bias; weights export transposed so numpy
multiplies ``x @ W``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from forgeline.lm.model import ModelConfig

#: Standard deviation of the initial weights (GPT-2's choice).
INIT_STD = 0.02


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned scale."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines for positions 0..length-1, computed as numpy does."""
    half = config.head_dim // 2
    inv_freq = config.rope_base ** (-np.arange(half, dtype=np.float64) / half)
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
    return (
        torch.from_numpy(np.cos(angles).astype(np.float32)),
        torch.from_numpy(np.sin(angles).astype(np.float32)),
    )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, len, head_dim) vectors by their positions' angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """Attention then feed-forward, each on a normalised residual stream."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.norm1 = RMSNorm(d, config.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = RMSNorm(d, config.norm_eps)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, d = x.shape
        c = self.config
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, c.n_heads, c.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, d))
        out: torch.Tensor = x + self.out(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))
        return out


class TransformerLM(nn.Module):
    """Token ids (batch, len) to next-token logits (batch, len, vocab)."""

    #: Rotary tables for positions 0..context-1 (buffers, not parameters).
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        cos, sin = rope_tables(config, config.context)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        # Residual projections start smaller so the stream's scale holds with depth.
        for layer in self.blocks():
            for weight in (layer.proj.weight, layer.out.weight):
                nn.init.normal_(weight, std=INIT_STD / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=INIT_STD)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        cos, sin = self.cos[:length], self.sin[:length]
        x = self.embed(tokens)
        for layer in self.blocks():
            x = layer(x, cos, sin)
        return self.norm(x) @ self.embed.weight.T  # type: ignore[no-any-return]

    def blocks(self) -> list[Block]:
        """The transformer blocks, typed."""
        return [block for block in self.layers if isinstance(block, Block)]

    def parameter_count(self) -> int:
        """Trainable parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def export(self) -> dict[str, np.ndarray]:
        """Weights as numpy arrays, named and laid out as :mod:`forgeline.lm.model` reads them."""

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float32).contiguous().numpy().copy()

        tensors = {"embed": arr(self.embed.weight), "norm": arr(self.norm.weight)}
        for i, block in enumerate(self.blocks()):
            tensors[f"layers.{i}.norm1"] = arr(block.norm1.weight)
            tensors[f"layers.{i}.norm2"] = arr(block.norm2.weight)
            for name in ("qkv", "proj", "fc", "out"):
                linear: nn.Linear = getattr(block, name)
                tensors[f"layers.{i}.{name}"] = arr(linear.weight.T)
        return tensors
