"""The model shipped inside the package: present, small, quick to load, and it learned English."""

from __future__ import annotations

import math

import numpy as np

from forgeline.backends.builtin import WEIGHTS_FILE, load_model, shipped_model_dir
from forgeline.lm.model import TransformerLM

#: The size budget from the built-in model issue (its load time is a benchmark figure).
MAX_WEIGHTS_BYTES = 25 * 1024 * 1024
AUSTEN = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife."
)


def mean_loss(model: TransformerLM, ids: list[int]) -> float:
    """Average next-token negative log-likelihood of ``ids``, in nats."""
    logits = model.logits_for(ids[:-1]).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())


def test_shipped_model_is_small_and_documented() -> None:
    """Weights within 25 MB, 3-15 M parameters, and a model card beside them."""
    loaded = load_model(shipped_model_dir())

    assert (shipped_model_dir() / WEIGHTS_FILE).stat().st_size <= MAX_WEIGHTS_BYTES
    assert 3_000_000 <= loaded.parameters <= 15_000_000
    assert (shipped_model_dir() / "MODEL_CARD.md").is_file()


def test_shipped_model_prefers_english_to_the_same_words_shuffled() -> None:
    """A sentence in order is far likelier to the model than its words in random order,
    and far better than chance (uniform over the vocabulary)."""
    loaded = load_model(shipped_model_dir())
    words = AUSTEN.split(" ")
    shuffled = " ".join(words[i] for i in np.random.default_rng(0).permutation(len(words)))

    in_order = mean_loss(loaded.model, loaded.tokenizer.encode(AUSTEN))
    out_of_order = mean_loss(loaded.model, loaded.tokenizer.encode(shuffled))
    assert in_order < out_of_order - 1.0
    assert in_order < math.log(loaded.tokenizer.vocab_size) - 2.0
