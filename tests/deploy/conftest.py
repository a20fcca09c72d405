"""Fixtures of the deploy tier: podman, the forgeline image, measured figures.

These tests need podman, debootstrap and the validators that
``scripts/system-deps`` installs; without them they fail with the command to
run, never skip.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.deploy.podman import STATE_DIR, BuildResult, Podman

FIGURES_FILE = STATE_DIR / "figures.json"

RecordFigure = Callable[[str, float], None]


@pytest.fixture(scope="session")
def podman() -> Podman:
    """podman configured for this machine, with its storage under .tools/podman."""
    return Podman()


@pytest.fixture(scope="session")
def record_figure() -> Iterator[RecordFigure]:
    """Keeps a measured figure (image size, start to ready...) in .tools/podman/figures.json."""
    figures: dict[str, float] = {}

    def record(name: str, value: float) -> None:
        figures[name] = round(value, 3)

    yield record
    if figures:
        FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
        known = json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.exists() else {}
        FIGURES_FILE.write_text(json.dumps({**known, **figures}, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def forgeline_image(podman: Podman, record_figure: RecordFigure) -> BuildResult:
    """deploy/Dockerfile built on local Debian-based images (once per session)."""
    built = podman.build_forgeline()
    record_figure("image_build_s", built.seconds)
    record_figure("image_size_mb", built.size_bytes / 1e6)
    return built


def repo_path(*parts: str) -> Path:
    """A path in the repository."""
    return Path(__file__).resolve().parents[2].joinpath(*parts)
