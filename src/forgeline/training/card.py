"""The model card written beside a trained model: what it is and how it was made."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from forgeline.lm.generate import Generation, Sampling
from forgeline.training.corpus import Provenance
from forgeline.training.train import TrainReport

CARD_FILE = "MODEL_CARD.md"
#: Prompts for the card's sample outputs, each generated with a fixed seed.
SAMPLE_PROMPTS = (
    "A lighthouse keeper finds a door in the sea.",
    "It was a fine morning in the village of Highbury.",
    '"I cannot think," said she,',
)
SAMPLE_TOKENS = 120
SAMPLE_SEED = 7


@dataclass(frozen=True)
class Sample:
    """One prompt and what the model wrote after it."""

    prompt: str
    text: str


def write_samples(model_dir: Path) -> list[Sample]:
    """Generate the card's samples with the numpy backend, as forgeline serves it."""
    from forgeline.backends.builtin import load_model

    loaded = load_model(model_dir)
    samples: list[Sample] = []
    for prompt in SAMPLE_PROMPTS:
        generation = Generation(
            loaded.model,
            loaded.tokenizer,
            prompt + "\n\n",
            max_tokens=SAMPLE_TOKENS,
            sampling=Sampling(temperature=0.8, top_k=40, seed=SAMPLE_SEED),
        )
        parts = []
        while not generation.finished:
            parts.append(generation.step())
        samples.append(Sample(prompt, "".join(parts).strip()))
    return samples


def write_card(
    out_dir: Path,
    texts: list[str],
    report: TrainReport,
    provenance: Provenance | None,
    *,
    command: str,
    notes: str = "",
) -> Path:
    """Write ``MODEL_CARD.md`` (and the corpus provenance) beside a trained model."""
    from forgeline.lm.tokenizer import Tokenizer
    from forgeline.training.train import TOKENIZER_FILE, WEIGHTS_FILE

    tokenizer = Tokenizer.load(out_dir / TOKENIZER_FILE)
    chars = sum(len(text) for text in texts)
    tokens = sum(len(tokenizer.encode(text)) for text in texts)
    card = render_card(
        report,
        provenance,
        write_samples(out_dir),
        weights_bytes=(out_dir / WEIGHTS_FILE).stat().st_size,
        chars_per_token=chars / tokens,
        command=command,
        notes=notes,
    )
    path = out_dir / CARD_FILE
    path.write_text(card, encoding="utf-8")
    if provenance is not None:
        (out_dir / "provenance.json").write_text(json.dumps(asdict(provenance), indent=2) + "\n")
    return path


def render_card(
    report: TrainReport,
    provenance: Provenance | None,
    samples: list[Sample],
    *,
    weights_bytes: int,
    chars_per_token: float,
    command: str,
    notes: str = "",
) -> str:
    """The Markdown model card."""
    o = report.options
    if provenance is not None:
        corpus = (
            f"{', '.join(provenance.documents)}: Jane Austen's six novels, from the Debian "
            f"package `{provenance.package}` version {provenance.version} "
            f"(.deb SHA-256 `{provenance.sha256}`), fetched with `apt-get download` by "
            f"`forgeline train`.\n\n**Licence.** {provenance.licence}"
        )
    else:
        corpus = "Text files given on the command line (see the training command below)."
    bits_per_char = report.best_heldout_loss / math.log(2) / chars_per_token
    title = "The built-in story model" if provenance is not None else "A forgeline model"
    lines = [
        f"# {title}",
        "",
        "A small demonstration model that lets forgeline generate text on a fresh machine, "
        "with no model server and no download. It writes prose in the manner of its corpus "
        "with loose grammar and little sense; it does not follow instructions. For real work "
        "point forgeline at a real model (see the README).",
        "",
        "## Corpus",
        "",
        corpus,
        "",
        f"The last {float(str(o['holdout_fraction'])):.0%} of each document is held out for "
        f"evaluation; {report.train_tokens:,} training tokens, {report.heldout_tokens:,} "
        "held-out tokens.",
        "",
        "## Model",
        "",
        f"- Decoder-only transformer: {o['n_layers']} layers, width {o['d_model']}, "
        f"{o['n_heads']} heads, context {o['context']} tokens; RMSNorm, rotary positions, "
        "GELU feed-forward, embeddings tied to the output layer.",
        f"- {report.parameters:,} parameters; weights file {weights_bytes / 1e6:.1f} MB "
        "(float32 safetensors).",
        f"- Tokenizer: byte-level BPE, {o['vocab_size']} tokens (about "
        f"{chars_per_token:.2f} characters per token on the corpus).",
        "- Inference: numpy only (`forgeline/lm/model.py`), with a key/value cache.",
        "",
        "## Training",
        "",
        f"- Hardware: {report.hardware}.",
        f"- Time: {report.seconds / 60:.1f} minutes, {report.steps:,} steps of "
        f"{o['batch_size']} × {o['context']} tokens ({report.tokens_seen:,} tokens, "
        f"{report.tokens_seen / max(report.train_tokens, 1):.2f} passes over the corpus).",
        f"- AdamW, peak learning rate {o['learning_rate']}, warm-up then cosine decay, "
        f"weight decay {o['weight_decay']}, seed {o['seed']}.",
        f"- Command: `{command}`",
        *([f"- {notes}"] if notes else []),
        "",
        "## Evaluation",
        "",
        f"Held-out loss {report.best_heldout_loss:.3f} nats per token "
        f"(perplexity {report.perplexity:.1f}; {bits_per_char:.2f} bits per character), "
        f"at step {report.best_step:,}, the weights shipped.",
        "",
        "| step | training loss | held-out loss |",
        "| ---: | ---: | ---: |",
        *(
            f"| {step:,} | {train:.3f} | {heldout:.3f} |"
            for step, train, heldout in report.history
            if not math.isnan(train)
        ),
        "",
        "## Samples",
        "",
        f"Temperature 0.8, top-k 40, seed {SAMPLE_SEED}, {SAMPLE_TOKENS} tokens, unedited.",
        "",
    ]
    for sample in samples:
        lines += [
            f"**{sample.prompt}**",
            "",
            *(f"> {line}" if line else ">" for line in sample.text.splitlines()),
            "",
        ]
    limitations = (
        "Trained for minutes on about four megabytes of early-nineteenth-century novels: "
        "expect period vocabulary, invented names, and sentences that drift. It knows nothing "
        "after 1818 and nothing outside its corpus."
        if provenance is not None
        else "A small model trained briefly: it imitates its corpus and knows nothing else."
    )
    lines += [
        "## Limitations",
        "",
        f"{limitations} Not for any use where the content matters.",
        "",
    ]
    return "\n".join(lines)
