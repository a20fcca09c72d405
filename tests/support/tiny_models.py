"""Small models made on the spot, so tests need no shipped or downloaded weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from forgeline.backends.builtin import TOKENIZER_FILE, WEIGHTS_FILE
from forgeline.lm.model import ModelConfig, tensor_names
from forgeline.lm.tokenizer import Tokenizer
from forgeline.lm.weights import save_weights
from forgeline.training.bpe import train_bpe

#: A few sentences to learn a tokenizer from.
SAMPLE_TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. "
    "The sea was calm, and the keeper of the lighthouse walked along the shore. "
    "She found a door standing in the water, and she opened it. "
) * 4


def random_numpy_model(directory: Path, *, vocab_size: int = 320, seed: int = 0) -> Path:
    """Write a randomly initialised built-in model (weights and tokenizer) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer: Tokenizer = train_bpe([SAMPLE_TEXT], vocab_size)
    tokenizer.save(directory / TOKENIZER_FILE)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, context=32
    )
    rng = np.random.default_rng(seed)
    d = config.d_model
    shapes = {"embed": (config.vocab_size, d), "norm": (d,)}
    for i in range(config.n_layers):
        shapes |= {
            f"layers.{i}.norm1": (d,),
            f"layers.{i}.qkv": (d, 3 * d),
            f"layers.{i}.proj": (d, d),
            f"layers.{i}.norm2": (d,),
            f"layers.{i}.fc": (d, 4 * d),
            f"layers.{i}.out": (4 * d, d),
        }
    tensors = {
        name: (
            np.ones(shapes[name], np.float32)
            if name.endswith(("norm", "norm1", "norm2"))
            else rng.normal(0, 0.5, shapes[name]).astype(np.float32)
        )
        for name in tensor_names(config)
    }
    save_weights(directory / WEIGHTS_FILE, tensors, {"config": config.to_json()})
    return directory


def random_hf_model(directory: Path, *, layers: int = 2, width: int = 32) -> Path:
    """Write a randomly initialised GPT-2 and a byte-level BPE tokenizer, both built here.

    Needs the [local] extra. Nothing is downloaded: the tokenizer is trained
    on :data:`SAMPLE_TEXT` and the model takes a fresh configuration.
    """
    import tokenizers
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(
        [SAMPLE_TEXT],
        tokenizers.trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(directory)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory
