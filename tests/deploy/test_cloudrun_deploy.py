"""deploy/cloudrun/deploy.sh: blue/green by revision tags, smoke-tested, rolled back on failure.

Cloud Run itself is replaced by tests/deploy/fake_gcloud.py, which keeps the
service's revisions and traffic as Cloud Run reports them; the smoke test is
the real one, against a real forgeline (a good revision) or a dead port (a
broken one).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAST_TIMINGS
from tests.deploy.conftest import repo_path
from tests.support.processes import ForgelineProcess, forgeline_env, free_port, settings_env

pytestmark = pytest.mark.slow

DEPLOY = repo_path("deploy", "cloudrun", "deploy.sh")
FAKE = Path(__file__).with_name("fake_gcloud.py")
REGISTRY = "europe-west1-docker.pkg.dev/demo/forgeline/forgeline"


@pytest.fixture
def forgeline(database_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A running api and worker: the URL every good revision serves at, and an admin key."""
    admin_key = f"fl_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    port = free_port()
    env = forgeline_env(
        settings_env(
            database_url=database_url,
            data_dir=tmp_path / "data",
            storage_url=(tmp_path / "artifacts").as_uri(),
            secret_key=secrets.token_urlsafe(48),
            openai_base_url="http://127.0.0.1:9/v1",
            **FAST_TIMINGS,
        )
    )
    api = ForgelineProcess(
        ["api"], {**env, "FORGELINE_PORT": str(port), "FORGELINE_ADMIN_KEY": admin_key},
        tmp_path / "api.log", port=port,
    ).start()  # fmt: skip
    worker = ForgelineProcess(["worker"], env, tmp_path / "worker.log").start()
    try:
        api.wait_ready(timeout_s=120)
        yield api.url, admin_key
    finally:
        api.stop()
        worker.stop()


class CloudRun:
    """The fake platform's state, and deploy.sh run against it."""

    def __init__(self, folder: Path, smoke_key: str) -> None:
        self.state_file = folder / "cloudrun.json"
        self.gcloud = folder / "gcloud"
        self.gcloud.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} {self.state_file} "$@"\n')
        self.gcloud.chmod(0o755)
        self.smoke_key = smoke_key
        self.save({"traffic": [], "urls": {}, "revisions": [], "never_ready": [], "calls": []})

    def load(self) -> dict[str, Any]:
        return dict(json.loads(self.state_file.read_text()))

    def save(self, state: dict[str, Any]) -> None:
        self.state_file.write_text(json.dumps(state))

    def serving(self) -> list[tuple[str, int, str | None]]:
        return [(t["revisionName"], t["percent"], t.get("tag")) for t in self.load()["traffic"]]

    def deploy(
        self, kind: str, tag: str, url: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run deploy.sh for image REGISTRY:tag, whose revision serves at ``url``."""
        state = self.load()
        revision = f"forgeline-{kind}-{tag}"
        if url is None:
            state["never_ready"].append(revision)
        else:
            state["urls"][revision] = url
        self.save(state)
        env = {
            **os.environ,
            "GCLOUD": str(self.gcloud),
            "PROJECT_ID": "demo",
            "REGION": "europe-west1",
            "CLOUDSQL_INSTANCE": "demo:europe-west1:forgeline",
            "BUCKET": "demo-artifacts",
            "VPC_NETWORK": "default",
            "VPC_SUBNET": "default",
            "FORGELINE_SMOKE_KEY": self.smoke_key,
            "SMOKE_TIMEOUT_S": "30",
        }
        return subprocess.run(
            [str(DEPLOY), kind, f"{REGISTRY}:{tag}"],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip


def test_blue_green_shifts_after_a_smoke_test_and_rolls_back_a_broken_revision(
    forgeline: tuple[str, str], tmp_path: Path
) -> None:
    """First deploy, a good release, a broken one (rolled back), one never ready (untouched)."""
    url, key = forgeline
    cloud = CloudRun(tmp_path, key)

    first = cloud.deploy("api", "aaa111", url)
    assert first.returncode == 0, first.stderr
    assert cloud.serving() == [("forgeline-api-aaa111", 100, None)]

    good = cloud.deploy("api", "bbb222", url)
    assert good.returncode == 0, good.stderr
    rendered = cloud.load()["rendered"]
    container = rendered["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{REGISTRY}:bbb222"
    # Created with no traffic and the candidate tag, shifted only after the smoke test.
    assert rendered["spec"]["traffic"] == [
        {"revisionName": "forgeline-api-aaa111", "percent": 100},
        {"revisionName": "forgeline-api-bbb222", "percent": 0, "tag": "candidate"},
    ]
    assert cloud.serving()[0] == ("forgeline-api-bbb222", 100, None)
    assert good.stderr.count("smoke test") >= 2

    broken = cloud.deploy("api", "ccc333", f"http://127.0.0.1:{free_port()}")
    assert broken.returncode == 1
    assert "smoke test FAILED" in broken.stderr
    assert "rolling back: all traffic to forgeline-api-bbb222" in broken.stderr
    assert cloud.serving() == [("forgeline-api-bbb222", 100, None)]

    never = cloud.deploy("api", "ddd444", None)
    assert never.returncode == 1
    assert "did not become ready" in never.stderr
    assert cloud.serving() == [("forgeline-api-bbb222", 100, None)]


def test_worker_revision_takes_over_once_ready(tmp_path: Path) -> None:
    """Workers roll straight to the new revision; one that never gets ready changes nothing."""
    cloud = CloudRun(tmp_path, "unused")
    assert cloud.deploy("worker", "aaa111", "http://worker.internal").returncode == 0
    assert cloud.serving() == [("forgeline-worker-aaa111", 100, None)]
    failed = cloud.deploy("worker", "bbb222", None)
    assert failed.returncode == 1
    assert cloud.serving() == [("forgeline-worker-aaa111", 100, None)]
    container = cloud.load()["rendered"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["serve"]
