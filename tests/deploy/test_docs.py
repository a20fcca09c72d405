"""The deployment docs point at things that exist."""

from __future__ import annotations

import re

import yaml

from tests.deploy.conftest import repo_path


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_links_to_a_runbook_section() -> None:
    """Each alert's runbook annotation names a heading that RUNBOOK.md has."""
    runbook = repo_path("docs", "RUNBOOK.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", runbook, flags=re.MULTILINE)}
    rules = yaml.safe_load(repo_path("deploy", "prometheus", "alerts.yml").read_text())
    alerts = [r for group in rules["groups"] for r in group["rules"] if "alert" in r]
    assert len(alerts) == 7
    for rule in alerts:
        link = rule["annotations"]["runbook"]
        assert link.startswith("docs/RUNBOOK.md#"), link
        assert link.split("#", 1)[1] in anchors, link
    # Links inside the runbook itself resolve too.
    for target in re.findall(r"\]\(#([\w-]+)\)", runbook):
        assert target in anchors, target


def test_paths_named_in_the_docs_exist() -> None:
    """Every repository path the deployment docs mention in backticks is there."""
    pattern = (
        r"`((?:deploy|docs|scripts|tests|\.github)/[\w./-]+"
        r"|compose(?:\.prod)?\.yaml|\.env\.example)"
    )
    for doc in ("DEPLOYMENT.md", "RUNBOOK.md"):
        text = repo_path("docs", doc).read_text()
        paths = set(re.findall(pattern, text))
        assert len(paths) >= 5, doc
        for path in paths:
            assert repo_path(path.rstrip(".")).exists(), f"{doc}: {path}"
