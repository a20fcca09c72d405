"""Training on the CPU, its export, and the numpy backend running what it exported.

Needs the [train] extra (torch); scripts/ml-deps installs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from forgeline.backends.base import GenerationRequest
from forgeline.backends.builtin import BuiltinBackend, load_model
from forgeline.cli import app
from forgeline.lm.model import ModelConfig
from forgeline.training.model import TransformerLM
from forgeline.training.train import WEIGHTS_FILE, TrainOptions, load_exported, train
from tests.support.tiny_models import SAMPLE_TEXT

TINY = TrainOptions(
    vocab_size=300,
    d_model=32,
    n_layers=2,
    n_heads=4,
    context=32,
    batch_size=8,
    max_steps=40,
    time_budget_s=600.0,
    learning_rate=3e-3,
    warmup_steps=5,
    eval_every=20,
    eval_batches=2,
    holdout_fraction=0.2,
    threads=1,
)
TEXTS = [SAMPLE_TEXT * 3, SAMPLE_TEXT.upper() * 3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for a few steps; its folder."""
    out = tmp_path_factory.mktemp("tiny")
    train(TEXTS, out, TINY, log=lambda _: None)
    return out


def test_training_lowers_the_held_out_loss(trained: Path) -> None:
    """After a few steps the held-out loss is well below its starting value."""
    import json

    history = json.loads((trained / "training.json").read_text())["history"]
    assert history[0][0] == 0
    assert history[-1][2] < history[0][2] - 1.0


def test_numpy_backend_matches_torch_logits(trained: Path) -> None:
    """The exported weights give the same logits in numpy as in torch."""
    loaded = load_model(trained)
    torch_model = TransformerLM(loaded.model.config).eval()
    load_exported(torch_model, trained / WEIGHTS_FILE)
    tokens = loaded.tokenizer.encode("The sea was calm, and she opened the door.")[:32]

    with torch.no_grad():
        expected = torch_model(torch.tensor([tokens]))[0].numpy()
    np.testing.assert_allclose(loaded.model.logits_for(tokens), expected, atol=1e-4)


def test_same_seed_trains_the_same_weights(trained: Path, tmp_path: Path) -> None:
    """A second run with the same seed exports a byte-identical weights file."""
    train(TEXTS, tmp_path, TINY, log=lambda _: None)

    assert (tmp_path / WEIGHTS_FILE).read_bytes() == (trained / WEIGHTS_FILE).read_bytes()


async def test_builtin_backend_generates_with_the_export(trained: Path) -> None:
    """The built-in backend streams text from a freshly trained model."""
    backend = BuiltinBackend(model_dir=trained)
    request = GenerationRequest(prompt="The sea", max_tokens=30, seed=1)

    text = "".join([d.text async for d in backend.stream(request)])
    assert text.strip()


def test_fine_tuning_starts_from_given_weights(trained: Path, tmp_path: Path) -> None:
    """Starting from exported weights, the first evaluation already has their loss."""
    import json

    options = TrainOptions(**{**TINY.__dict__, "max_steps": 0, "init_from": trained / WEIGHTS_FILE})
    from forgeline.lm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(trained / "tokenizer.json")
    report = train(TEXTS, tmp_path, options, log=lambda _: None, tokenizer=tokenizer)
    first = json.loads((trained / "training.json").read_text())["best_heldout_loss"]
    assert report.best_heldout_loss == pytest.approx(first, abs=1e-5)


def test_train_command_writes_a_model_and_its_card(tmp_path: Path) -> None:
    """`forgeline train FILES` leaves weights, tokenizer and a model card with figures."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 4)
    out = tmp_path / "model"

    result = CliRunner().invoke(
        app,
        [
            "train",
            str(corpus),
            "--out",
            str(out),
            "--max-steps",
            "6",
            "--vocab-size",
            "300",
            "--d-model",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--context",
            "16",
            "--batch-size",
            "4",
            "--eval-every",
            "3",
        ],
    )

    assert result.exit_code == 0, result.output
    card = (out / "MODEL_CARD.md").read_text()
    assert "Held-out loss" in card
    assert "A lighthouse keeper finds a door in the sea." in card
    assert isinstance(load_model(out).model.config, ModelConfig)
