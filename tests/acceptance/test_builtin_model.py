"""`forgeline generate` on the built-in model, as on a fresh machine: no model server."""

from __future__ import annotations

import re
from pathlib import Path

from tests.acceptance.conftest import EnvFactory
from tests.support.processes import run_cli

PROMPT = "A lighthouse keeper finds a door in the sea"


def test_generate_prints_a_story_from_the_builtin_model(forgeline_environ: EnvFactory) -> None:
    """With the default backend, generate prints prose: many words, mostly real ones,
    and the same seed gives the same story in another process."""
    env = forgeline_environ(backend="builtin")
    args = ["generate", PROMPT, "--seed", "5", "--max-tokens", "200"]

    first = run_cli(args, env)
    second = run_cli(args, env)

    assert first.returncode == 0, first.stdout + first.stderr
    words = re.findall(r"[A-Za-z]+", first.stdout)
    assert len(words) >= 60
    common = {"the", "and", "of", "to", "a", "in", "was", "her", "i", "it", "she", "he", "be"}
    assert sum(w.lower() in common for w in words) >= len(words) // 8
    assert second.stdout == first.stdout


def test_generate_names_a_missing_weights_file(
    forgeline_environ: EnvFactory, tmp_path: Path
) -> None:
    """A model folder without weights fails the job with a message naming the file."""
    folder = tmp_path / "no-model"
    folder.mkdir()
    env = forgeline_environ(backend="builtin", builtin_model_path=folder)

    result = run_cli(["generate", PROMPT, "--max-tokens", "5"], env)

    assert result.returncode != 0
    assert str(folder / "model.safetensors") in result.stdout + result.stderr
