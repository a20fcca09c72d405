"""The built-in model's speed and footprint, through the backend as jobs use it.

Figures: load time; memory (RSS) the loaded model adds, after load and after
generating; first-token latency (cold: including the load; warm: loaded);
tokens per second of one stream pinned to one core; and total tokens per
second of 8 concurrent streams on 2 cores, under a concurrency cap of 2 and
the default cap of 8. BLAS runs one thread per call, so the core count is
what the affinity mask allows. Targets from the built-in model issue:
>= 150 tokens/s for one stream, load <= 1 s, <= 150 MB resident.

    python -m bench.builtin_model
    python -m bench.builtin_model --tokens 512 --json bench/results/builtin.json
"""

from __future__ import annotations

import os

# One BLAS thread per call: parallelism comes from concurrent streams, and a
# single stream's figure is then one core's. Set before numpy loads.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import asyncio  # noqa: E402 - after the thread settings above
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.support import base_parser, machine_info, print_machine, write_json  # noqa: E402
from forgeline.backends.base import GenerationRequest  # noqa: E402
from forgeline.backends.builtin import BuiltinBackend, load_model, shipped_model_dir  # noqa: E402

PROMPT = "Write a short story about: A lighthouse keeper finds a door in the sea."


def rss_mb() -> float:
    """This process's resident memory, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pin(cores: int) -> list[int]:
    """Restrict this process to its first ``cores`` allowed cores; return them."""
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[:cores]
    os.sched_setaffinity(0, chosen)
    return chosen


async def one_stream(backend: BuiltinBackend, tokens: int, seed: int) -> dict[str, float]:
    """Time one generation: first text, end, and the tokens it made."""
    request = GenerationRequest(prompt=PROMPT, max_tokens=tokens, seed=seed)
    started = time.perf_counter()
    first = None
    completion = 0
    async for delta in backend.stream(request):
        if delta.text and first is None:
            first = time.perf_counter() - started
        if delta.usage is not None:
            completion = delta.usage.completion_tokens
    total = time.perf_counter() - started
    return {"first_s": first or total, "total_s": total, "tokens": completion}


async def measure(tokens: int, allowed: list[int]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    model_dir = shipped_model_dir()
    weights = model_dir / "model.safetensors"
    figures["weights_mb"] = round(weights.stat().st_size / 1e6, 2)

    # Cold: the first load in this process, then the first token after it.
    before = rss_mb()
    backend = BuiltinBackend()
    cold = await one_stream(backend, 8, seed=0)
    loaded = await backend.model()
    figures["load_s_first"] = round(loaded.load_s, 4)
    figures["first_token_cold_s"] = round(cold["first_s"], 4)
    after_use = rss_mb()
    loads = [load_model(model_dir).load_s for _ in range(5)]
    figures["load_s_median"] = round(statistics.median(loads), 4)
    figures["rss_before_mb"] = round(before, 1)
    figures["rss_added_mb"] = round(after_use - before, 1)

    # One stream, one core.
    os.sched_setaffinity(0, allowed[:1])
    cpu_before = time.process_time()
    runs = [await one_stream(backend, tokens, seed=s) for s in range(3)]
    cpu_used = time.process_time() - cpu_before
    made = sum(r["tokens"] for r in runs)
    figures["single_tokens_per_s"] = round(made / sum(r["total_s"] for r in runs), 1)
    # Per CPU-second: what one core does when nothing else wants it.
    figures["single_tokens_per_cpu_s"] = round(made / cpu_used, 1)
    figures["first_token_warm_ms"] = round(1000 * statistics.median(r["first_s"] for r in runs), 2)
    figures["single_tokens"] = [int(r["tokens"]) for r in runs]

    # Eight streams at once, two cores, default cap and a cap of eight.
    os.sched_setaffinity(0, allowed[:2])
    figures["cores_for_concurrent"] = len(allowed[:2])
    for cap in (2, 8):
        capped = BuiltinBackend(max_concurrency=cap)
        await capped.model()
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(capped, tokens, seed=s) for s in range(8)))
        wall = time.perf_counter() - started
        made = sum(r["tokens"] for r in results)
        firsts = sorted(r["first_s"] for r in results)
        figures[f"concurrent8_cap{cap}"] = {
            "total_tokens_per_s": round(made / wall, 1),
            "per_stream_tokens_per_s": round(
                statistics.median(r["tokens"] / r["total_s"] for r in results), 1
            ),
            "first_token_ms_median": round(1000 * statistics.median(firsts), 1),
            "first_token_ms_max": round(1000 * firsts[-1], 1),
            "tokens": made,
            "wall_s": round(wall, 2),
        }
        await capped.aclose()
    figures["rss_after_all_mb"] = round(rss_mb(), 1)
    await backend.aclose()
    return figures


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation")
    args = parser.parse_args()
    info = machine_info()
    allowed = sorted(os.sched_getaffinity(0))
    figures = asyncio.run(measure(args.tokens, allowed))
    print_machine(info)
    print(f"load avg    {info['load_average_1m']} (1 min, at start)")
    print(f"weights     {figures['weights_mb']} MB")
    print(
        f"load        {figures['load_s_first']:.3f} s first, "
        f"{figures['load_s_median']:.3f} s median"
    )
    print(f"memory      +{figures['rss_added_mb']} MB RSS after load and first generation")
    print(
        f"first token {figures['first_token_cold_s'] * 1000:.0f} ms cold (with load), "
        f"{figures['first_token_warm_ms']} ms warm"
    )
    print(
        f"one stream  {figures['single_tokens_per_s']} tokens/s on 1 core "
        f"({figures['single_tokens_per_cpu_s']} per CPU-second)"
    )
    for cap in (2, 8):
        c = figures[f"concurrent8_cap{cap}"]
        print(
            f"8 streams   cap {cap}: {c['total_tokens_per_s']} tokens/s in total on 2 cores, "
            f"{c['per_stream_tokens_per_s']} per stream, first token median "
            f"{c['first_token_ms_median']} ms, max {c['first_token_ms_max']} ms"
        )
    write_json(args.json, {"machine": info, **figures})


if __name__ == "__main__":
    main()
