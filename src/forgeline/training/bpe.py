"""Learn byte-level BPE merges from a corpus (pure Python, no torch).

Counts each distinct word once with its frequency, then repeatedly merges the
most frequent neighbouring pair. Pair counts are updated only in the words a
merge touches, so a few thousand merges over a novel-sized corpus take
seconds. Ties break on the smaller pair, which keeps the result identical
from run to run.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise

from forgeline.lm.tokenizer import WORD_PATTERN, Tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A tokenizer with ``vocab_size`` tokens (256 bytes + merges + end-of-text)."""
    merges_wanted = vocab_size - 257
    if merges_wanted < 0:
        raise ValueError("vocab_size must be at least 257 (bytes and end-of-text)")
    word_counts: Counter[str] = Counter()
    for text in texts:
        word_counts.update(WORD_PATTERN.findall(text))
    words = [list(word.encode("utf-8")) for word in word_counts]
    freqs = list(word_counts.values())

    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for index, symbols in enumerate(words):
        for pair in pairwise(symbols):
            pair_counts[pair] += freqs[index]
            where[pair].add(index)
    # A max-heap of (-count, pair); stale entries are skipped when popped.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < merges_wanted and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        touched: Counter[tuple[int, int]] = Counter()
        for index in where.pop(pair):
            symbols, freq = words[index], freqs[index]
            for old in pairwise(symbols):
                touched[old] -= freq
            words[index] = symbols = _replace(symbols, pair, new_id)
            for new in pairwise(symbols):
                touched[new] += freq
                where[new].add(index)
        del pair_counts[pair]
        for changed, delta in touched.items():
            if delta == 0 or changed == pair:
                continue
            pair_counts[changed] += delta
            heapq.heappush(heap, (-pair_counts[changed], changed))
    return Tokenizer(merges)


def _replace(symbols: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out: list[int] = []
    at = 0
    while at < len(symbols):
        if at < len(symbols) - 1 and symbols[at] == pair[0] and symbols[at + 1] == pair[1]:
            out.append(new_id)
            at += 2
        else:
            out.append(symbols[at])
            at += 1
    return out
