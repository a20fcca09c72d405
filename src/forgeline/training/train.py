"""Train a model from text files and export it for the built-in backend.

The steps: learn a tokenizer, split each document into training text and a
held-out tail, train the transformer with AdamW on random windows, and
export the weights with the best held-out loss. Training stops at a step
count or a time budget, whichever comes first; the learning rate follows
whichever of the two is further along, so a time-limited run still ends
with its decay. Seeds fix the data order and initial weights.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from forgeline.lm.model import ModelConfig
from forgeline.lm.tokenizer import Tokenizer
from forgeline.lm.weights import save_weights
from forgeline.training.bpe import train_bpe
from forgeline.training.model import TransformerLM

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
REPORT_FILE = "training.json"


@dataclass(frozen=True)
class TrainOptions:
    """Knobs of one training run; defaults make the shipped model."""

    vocab_size: int = 2048
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    context: int = 128
    batch_size: int = 16
    max_steps: int = 100_000
    time_budget_s: float = 30 * 60.0
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    holdout_fraction: float = 0.05
    eval_every: int = 100
    eval_batches: int = 12
    seed: int = 1234
    #: CPU threads; one wastes least on a machine shared with other work.
    threads: int | None = 1
    device: str = "cpu"
    #: Start from these weights (fine-tuning) instead of random ones.
    init_from: Path | None = None


@dataclass
class TrainReport:
    """What a run did, for the model card."""

    parameters: int
    train_tokens: int
    heldout_tokens: int
    steps: int
    tokens_seen: int
    seconds: float
    best_heldout_loss: float
    best_step: int
    hardware: str
    options: dict[str, object]
    history: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        """exp(held-out loss), per token."""
        return math.exp(self.best_heldout_loss)


def split_documents(
    documents: list[list[int]], holdout_fraction: float, end_of_text: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out token streams: the tail of each document is held out."""
    train: list[int] = []
    heldout: list[int] = []
    for ids in documents:
        cut = int(len(ids) * (1.0 - holdout_fraction))
        train += [*ids[:cut], end_of_text]
        heldout += [*ids[cut:], end_of_text]
    return np.asarray(train, dtype=np.int64), np.asarray(heldout, dtype=np.int64)


def hardware_description(device: str) -> str:
    """A line naming the processor and thread count (or the GPU) used."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    plural = "s" if threads != 1 else ""
    return f"{cpu}, {threads} CPU thread{plural} (torch {torch.__version__})"


def train(
    texts: list[str],
    out_dir: Path,
    options: TrainOptions = TrainOptions(),
    *,
    log: Callable[[str], None] = print,
    tokenizer: Tokenizer | None = None,
) -> TrainReport:
    """Train on ``texts`` (one document each) and export to ``out_dir``.

    Writes ``model.safetensors``, ``tokenizer.json`` and ``training.json``;
    the weights are rewritten whenever the held-out loss improves, so an
    interrupted run leaves its best model behind.
    """
    started = time.monotonic()
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = train_bpe(texts, options.vocab_size)
        log(f"tokenizer: {tokenizer.vocab_size} tokens in {time.monotonic() - started:.1f} s")
    tokenizer.save(out_dir / TOKENIZER_FILE)
    documents = [tokenizer.encode(text) for text in texts]
    train_ids, heldout_ids = split_documents(
        documents, options.holdout_fraction, tokenizer.end_of_text
    )
    if min(len(train_ids), len(heldout_ids)) <= options.context + 1:
        raise ValueError("corpus too small for the context length; add text or lower it")
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=options.d_model,
        n_layers=options.n_layers,
        n_heads=options.n_heads,
        context=options.context,
    )
    device = torch.device(options.device)
    model = TransformerLM(config)
    if options.init_from is not None:
        load_exported(model, options.init_from)
    model.to(device)
    log(f"model: {model.parameter_count():,} parameters, {len(train_ids):,} training tokens")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": options.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=options.learning_rate,
        betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(options.seed)
    train_tensor = torch.from_numpy(train_ids)
    heldout_batches = _heldout_batches(heldout_ids, options)

    report = TrainReport(
        parameters=model.parameter_count(),
        train_tokens=len(train_ids),
        heldout_tokens=len(heldout_ids),
        steps=0,
        tokens_seen=0,
        seconds=0.0,
        best_heldout_loss=math.inf,
        best_step=0,
        hardware=hardware_description(options.device),
        options={k: str(v) for k, v in asdict(options).items()},
    )
    loop_start = time.monotonic()
    step = 0
    train_loss = math.nan
    while True:
        progress = max(
            step / options.max_steps if options.max_steps > 0 else 1.0,
            (time.monotonic() - loop_start) / options.time_budget_s,
        )
        done = progress >= 1.0
        if step % options.eval_every == 0 or done:
            heldout = _evaluate(model, heldout_batches, device)
            report.history.append((step, train_loss, heldout))
            log(
                f"step {step}: train {train_loss:.3f} held-out {heldout:.3f} "
                f"({time.monotonic() - started:.0f} s)"
            )
            if heldout < report.best_heldout_loss:
                report.best_heldout_loss, report.best_step = heldout, step
                export(model, config, out_dir, note=f"step {step}")
        if done:
            break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, progress, options)
        starts = rng.integers(0, len(train_ids) - options.context - 1, size=options.batch_size)
        window = torch.stack([train_tensor[s : s + options.context + 1] for s in starts]).to(device)
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        train_loss = loss.item()
        step += 1
        report.tokens_seen += options.batch_size * options.context
    report.steps = step
    report.seconds = time.monotonic() - loop_start
    (out_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def export(model: TransformerLM, config: ModelConfig, out_dir: Path, *, note: str = "") -> Path:
    """Write the model's weights for the numpy backend; same weights, same bytes."""
    path = out_dir / WEIGHTS_FILE
    partial = path.with_suffix(".partial")
    save_weights(partial, model.export(), {"config": config.to_json(), "note": note})
    os.replace(partial, path)  # readers never see half a file
    return path


def _learning_rate(step: int, progress: float, options: TrainOptions) -> float:
    if step < options.warmup_steps:
        return options.learning_rate * (step + 1) / options.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return options.learning_rate * (options.min_lr_ratio + (1 - options.min_lr_ratio) * cosine)


def _heldout_batches(heldout: np.ndarray, options: TrainOptions) -> list[torch.Tensor]:
    """Fixed, evenly spaced held-out windows, so every evaluation sees the same text."""
    span = options.context + 1
    count = min(options.eval_batches * options.batch_size, (len(heldout) - 1) // span)
    starts = np.linspace(0, len(heldout) - span, num=max(count, 1)).astype(np.int64)
    windows = torch.from_numpy(np.stack([heldout[s : s + span] for s in starts]))
    size = options.batch_size
    return [windows[at : at + size] for at in range(0, len(windows), size)]


@torch.no_grad()
def _evaluate(model: TransformerLM, batches: list[torch.Tensor], device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def load_exported(model: TransformerLM, weights: Path) -> None:
    """Put weights written by :func:`export` into ``model`` (to fine-tune or compare)."""
    from forgeline.lm.weights import load_weights

    tensors, _ = load_weights(weights)
    state = {}
    for name, array in tensors.items():
        value = torch.from_numpy(np.array(array))
        # Linear weights are stored transposed (numpy computes x @ W).
        if name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc", "out"):
            value = value.T.contiguous()
        state[f"{name}.weight"] = value
    model.load_state_dict(state)
