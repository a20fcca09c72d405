"""docs/CONFIGURATION.md and .env.example follow the settings class and the compose files."""

from __future__ import annotations

import re
import subprocess
import sys

from forgeline.settings import ENV_PREFIX, Settings
from tests.deploy.conftest import repo_path


def test_configuration_reference_is_current() -> None:
    """The generated reference and .env.example block match Settings as it is now."""
    result = subprocess.run(
        [sys.executable, str(repo_path("scripts", "config_reference.py")), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_reference_lists_every_setting_once() -> None:
    """Each FORGELINE_* variable of Settings has exactly one row in docs/CONFIGURATION.md."""
    doc = repo_path("docs", "CONFIGURATION.md").read_text()
    for name in Settings.model_fields:
        assert doc.count(f"| `{ENV_PREFIX}{name.upper()}` |") == 1, name


def test_env_example_defines_every_variable_the_compose_files_use() -> None:
    """No ${VAR} in compose.yaml or compose.prod.yaml is missing from .env.example."""
    example = repo_path(".env.example").read_text()
    defined = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    for compose in ("compose.yaml", "compose.prod.yaml"):
        used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", repo_path(compose).read_text()))
        assert used - defined == set(), compose
    # The forgeline secrets the stacks need are given a line of their own.
    for secret in ("FORGELINE_SECRET_KEY", "FORGELINE_ADMIN_KEY", "FORGELINE_METRICS_TOKEN"):
        assert re.search(rf"^{secret}=$", example, flags=re.MULTILINE), secret
