"""``forgeline train``: the command line of :mod:`forgeline.training`.

Imports torch only when run, so the rest of the CLI works without the
``[train]`` extra.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

#: Where ``forgeline train`` writes a model when no folder is given.
DEFAULT_OUT = Path("forgeline-model")


def train(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            help="UTF-8 text files, one document each. None: Jane Austen's novels, "
            "fetched from Debian's package archive.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the model.")] = DEFAULT_OUT,
    minutes: Annotated[float, typer.Option(help="Training time budget.")] = 30.0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps.")] = 100_000,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer size.")] = 2048,
    d_model: Annotated[int, typer.Option(help="Model width.")] = 256,
    layers: Annotated[int, typer.Option(help="Transformer layers.")] = 4,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 8,
    context: Annotated[int, typer.Option(help="Context length in tokens.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    eval_every: Annotated[int, typer.Option(help="Steps between held-out evaluations.")] = 100,
    threads: Annotated[int, typer.Option(help="CPU threads (1 is fastest on a busy machine).")] = 1,
    device: Annotated[str, typer.Option(help="cpu, or cuda for a GPU.")] = "cpu",
    init_from: Annotated[
        Path | None, typer.Option(help="Fine-tune: start from these weights (same tokenizer).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for data order and initial weights.")] = 1234,
) -> None:
    """Train a small language model and export it for the built-in backend."""
    try:
        from forgeline.training.card import write_card
        from forgeline.training.corpus import fetch_austen, read_corpus
        from forgeline.training.train import TrainOptions
        from forgeline.training.train import train as run_training
    except ImportError as exc:
        typer.echo(f"error: forgeline train needs the [train] extra (torch): {exc}", err=True)
        raise typer.Exit(2) from None
    from forgeline.lm.tokenizer import Tokenizer

    provenance = None
    if files:
        texts = read_corpus(files)
    else:
        typer.echo("fetching the corpus (Debian package r-cran-janeaustenr)")
        with tempfile.TemporaryDirectory(prefix="forgeline-corpus-") as corpus_dir:
            try:
                paths, provenance = fetch_austen(Path(corpus_dir))
            except RuntimeError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
            texts = read_corpus(paths)
    tokenizer = None
    if init_from is not None:
        # Fine-tuning keeps the tokenizer the weights were trained with.
        tokenizer = Tokenizer.load(init_from.parent / "tokenizer.json")
        vocab_size = tokenizer.vocab_size
    options = TrainOptions(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=layers,
        n_heads=heads,
        context=context,
        batch_size=batch_size,
        max_steps=max_steps,
        time_budget_s=minutes * 60.0,
        learning_rate=learning_rate,
        eval_every=eval_every,
        seed=seed,
        threads=threads,
        device=device,
        init_from=init_from,
    )
    report = run_training(texts, out, options, log=typer.echo, tokenizer=tokenizer)
    command = " ".join(["forgeline", *map(shlex.quote, sys.argv[1:])])
    write_card(out, texts, report, provenance, command=command)
    typer.echo(
        f"held-out loss {report.best_heldout_loss:.3f} (perplexity {report.perplexity:.1f}) "
        f"after {report.steps} steps; model in {out}"
    )
