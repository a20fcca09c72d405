"""Preparing training text: reflowing wrapped lines and reading files."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgeline.training.corpus import read_corpus, reflow


def test_reflow_joins_wrapped_lines_into_paragraphs() -> None:
    """Hard-wrapped lines become one line per paragraph, a blank line between, no italics marks."""
    lines = [
        "CHAPTER I",
        "",
        "It is a truth  universally",
        "acknowledged, that a _single_ man",
        "",
        "",
        "End.",
    ]

    assert reflow(lines) == (
        "CHAPTER I\n\nIt is a truth universally acknowledged, that a single man\n\nEnd.\n"
    )


def test_read_corpus_refuses_an_empty_file(tmp_path: Path) -> None:
    """An empty training file is an error naming it, not a silent gap."""
    good, empty = tmp_path / "good.txt", tmp_path / "empty.txt"
    good.write_text("Some text.")
    empty.write_text("  \n")

    assert read_corpus([good]) == ["Some text."]
    with pytest.raises(ValueError, match=r"empty\.txt"):
        read_corpus([good, empty])
