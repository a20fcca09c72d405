"""The transformers backend's tokens/s on a randomly initialised GPT-2, 1 and 8 streams.

Builds the model here (nothing downloaded): GPT-2 small's shape by default,
about 124 M parameters with a 50,257-token vocabulary, random weights, and a
byte-level BPE tokenizer trained on a few sentences and padded with added
tokens to the model's vocabulary so every sampled id decodes. Runs on the
GPU when torch sees one (``--device``). Needs the [local] extra.

    python -m bench.transformers_backend                      # 124 M, auto device
    python -m bench.transformers_backend --layers 2 --width 128 --tokens 64
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers

from bench.support import base_parser, machine_info, print_machine, write_json
from forgeline.backends.base import GenerationRequest
from forgeline.backends.transformers_local import TransformersBackend

TEXT = "The keeper of the lighthouse walked along the shore and found a door in the sea. " * 20
PROMPT = "Write a short story about: A lighthouse keeper finds a door in the sea."


def build_model(directory: Path, *, layers: int, width: int, heads: int, vocab: int) -> int:
    """Write a random GPT-2 and its tokenizer to ``directory``; return the parameter count."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(
        [TEXT],
        tokenizers.trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    end = "<|endoftext|>"
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=end, bos_token=end
    )
    tokenizer.add_tokens([f" w{i}" for i in range(vocab - len(tokenizer))])
    tokenizer.save_pretrained(directory)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


async def streams(backend: TransformersBackend, count: int, tokens: int) -> dict[str, Any]:
    """Run ``count`` generations at once; total and per-stream tokens/s, first tokens."""

    async def one(seed: int) -> tuple[float, float, int]:
        request = GenerationRequest(prompt=PROMPT, max_tokens=tokens, seed=seed, temperature=1.0)
        started = time.perf_counter()
        first = None
        made = 0
        async for delta in backend.stream(request):
            if delta.text and first is None:
                first = time.perf_counter() - started
            if delta.usage is not None:
                made = delta.usage.completion_tokens
        return first or 0.0, time.perf_counter() - started, made

    started = time.perf_counter()
    results = await asyncio.gather(*(one(s) for s in range(count)))
    wall = time.perf_counter() - started
    made = sum(r[2] for r in results)
    return {
        "streams": count,
        "total_tokens_per_s": round(made / wall, 1),
        "per_stream_tokens_per_s": round(statistics.median(r[2] / r[1] for r in results), 1),
        "first_token_ms_median": round(1000 * statistics.median(r[0] for r in results), 1),
        "tokens": made,
        "wall_s": round(wall, 2),
    }


async def measure(args: Any, directory: Path) -> dict[str, Any]:
    params = build_model(
        directory, layers=args.layers, width=args.width, heads=args.heads, vocab=args.vocab
    )
    backend = TransformersBackend(
        model_path=directory, device=args.device, max_concurrency=args.max_concurrency
    )
    loaded = await backend.model()
    figures: dict[str, Any] = {
        "parameters": params,
        "device": str(loaded.device),
        "device_name": torch.cuda.get_device_name(0) if loaded.device.type == "cuda" else "cpu",
        "load_s": round(loaded.load_s, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    await streams(backend, 1, 8)  # warm-up: kernels, allocator
    figures["one"] = await streams(backend, 1, args.tokens)
    figures["eight"] = await streams(backend, 8, args.tokens)
    await backend.aclose()
    return figures


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per generation")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-") as tmp:
        figures = asyncio.run(measure(args, Path(tmp)))
    info = machine_info()
    print_machine(info)
    print(f"model       random GPT-2, {figures['parameters'] / 1e6:.1f} M parameters")
    print(f"device      {figures['device']} ({figures['device_name']}), load {figures['load_s']} s")
    for key in ("one", "eight"):
        f = figures[key]
        print(
            f"{f['streams']} stream(s)  {f['total_tokens_per_s']} tokens/s in total, "
            f"{f['per_stream_tokens_per_s']} per stream, first token median "
            f"{f['first_token_ms_median']} ms"
        )
    write_json(args.json, {"machine": info, **figures})


if __name__ == "__main__":
    main()
