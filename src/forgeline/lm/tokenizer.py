"""A byte-level BPE tokenizer, as GPT-2 uses, with one end-of-text token.

Text is split into words by a regular expression, each word's UTF-8 bytes are
the starting symbols, and learned merges join frequent neighbouring pairs.
Every byte is a token, so any text encodes and decoding never fails; a token
may end in the middle of a character, which :class:`StreamDecoder` handles.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

#: Words: an optional leading space, then letters, digits or punctuation;
#: runs of whitespace stay apart so a paragraph break is its own token.
WORD_PATTERN = re.compile(
    r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""", re.UNICODE
)
END_OF_TEXT = "<|endoftext|>"
#: How many distinct words keep their encoding cached.
WORD_CACHE_SIZE = 65536


class Tokenizer:
    """Encodes text to token ids and back.

    Ids 0-255 are bytes, 256 onwards are merges in the order learned, and
    the last id is the end-of-text token.
    """

    def __init__(self, merges: Iterable[tuple[int, int]]) -> None:
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            if a >= len(self.token_bytes) or b >= len(self.token_bytes):
                raise ValueError(f"merge ({a}, {b}) refers to a token not yet defined")
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self.end_of_text = len(self.token_bytes)
        self.vocab_size = self.end_of_text + 1
        self._encode_word = lru_cache(maxsize=WORD_CACHE_SIZE)(self._merge_word)

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (no end-of-text token is added)."""
        ids: list[int] = []
        for word in WORD_PATTERN.findall(text):
            ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; the end-of-text token decodes to nothing."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids``; a partial character stays partial."""
        return b"".join(self.token_bytes[i] for i in ids if i != self.end_of_text)

    def _merge_word(self, word: str) -> tuple[int, ...]:
        symbols = list(word.encode("utf-8"))
        while len(symbols) > 1:
            # Apply the earliest-learned merge present, as training did.
            best_rank, best_at = len(self._ranks), -1
            for at in range(len(symbols) - 1):
                rank = self._ranks.get((symbols[at], symbols[at + 1]), best_rank)
                if rank < best_rank:
                    best_rank, best_at = rank, at
            if best_at < 0:
                break
            merged = 256 + best_rank
            out: list[int] = []
            at = 0
            pair = self.merges[best_rank]
            while at < len(symbols):
                if at < len(symbols) - 1 and (symbols[at], symbols[at + 1]) == pair:
                    out.append(merged)
                    at += 2
                else:
                    out.append(symbols[at])
                    at += 1
            symbols = out
        return tuple(symbols)

    # -- files ----------------------------------------------------------------
    def to_json(self) -> str:
        """The tokenizer as stable JSON (same merges, same bytes)."""
        return json.dumps(
            {"kind": "byte-bpe", "version": 1, "end_of_text": END_OF_TEXT, "merges": self.merges},
            separators=(",", ":"),
        )

    def save(self, path: Path) -> None:
        """Write the tokenizer to ``path`` as JSON."""
        path.write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`.

        Raises ``ValueError`` naming what is wrong when the file is not one.
        """
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("kind") != "byte-bpe":
            raise ValueError("not a byte-bpe tokenizer file")
        merges = data.get("merges")
        if not isinstance(merges, list) or not all(
            isinstance(m, list) and len(m) == 2 for m in merges
        ):
            raise ValueError("tokenizer merges must be a list of id pairs")
        return cls((m[0], m[1]) for m in merges)


class StreamDecoder:
    """Turns token ids into text one at a time, holding back split characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text completed by ``token`` (may be empty mid-character)."""
        return self._utf8.decode(self._tokenizer.decode_bytes((token,)))

    def flush(self) -> str:
        """Whatever is left (a dangling partial character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
