"""The forgeline image: built from a local Debian base, hardened, probed, drained."""

from __future__ import annotations

import gzip
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.deploy.conftest import RecordFigure
from tests.deploy.podman import BuildResult, Podman
from tests.support.processes import free_port

pytestmark = pytest.mark.slow

#: Regression guard on the uncompressed size: 318 MB measured on the local
#: python base (130 MB, trimmed as Debian's slim images are; 374 MB while the
#: openai SDK was a dependency and the base kept its translations). The
#: issue's target of 250 MB is out of reach without giving up function: of
#: the 188 MB environment, numpy with OpenBLAS (53 MB, for the built-in
#: model), SQLAlchemy (20 MB), the built-in model's weights (15 MB), obstore
#: (13 MB), psycopg's bundled libpq and OpenSSL (11 MB), pygments (rich's, 9
#: MB), beartype (coredis's, for the Redis rate limiter, 9 MB) and pydantic
#: (9 MB) are each in use.
SIZE_LIMIT_MB = 330
#: How the deploy files run forgeline: every container hardened the same way.
HARDENED = (
    "--read-only",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--network=host",
)
#: forgeline's own drain budget: worker drain (FORGELINE_DRAIN_TIMEOUT_S default)
#: plus the HTTP drain; every platform's grace period must exceed it.
DRAIN_BUDGET_S = 20 + 5


class Containers:
    """Containers started by one test, removed at its end."""

    def __init__(self, podman: Podman, image: str) -> None:
        self.podman = podman
        self.image = image
        self.names: list[str] = []

    def start(self, command: str, env: dict[str, str]) -> str:
        name = f"fl-{command}-{uuid.uuid4().hex[:8]}"
        env_args = [f"--env={key}={value}" for key, value in env.items()]
        self.podman.run("run", "-d", "--name", name, *HARDENED, *env_args, self.image, command)
        self.names.append(name)
        return name

    def run_once(self, command: str, env: dict[str, str]) -> str:
        env_args = [f"--env={key}={value}" for key, value in env.items()]
        result = self.podman.run("run", "--rm", *HARDENED, *env_args, self.image, command)
        return result.stdout

    def stop(self, name: str, grace_s: int) -> tuple[float, int]:
        """`podman stop` (SIGTERM, SIGKILL after grace_s); seconds taken and exit code."""
        started = time.monotonic()
        self.podman.run("stop", "-t", str(grace_s), name, timeout_s=grace_s + 30)
        took = time.monotonic() - started
        code = int(self.podman.run("inspect", name, "--format", "{{.State.ExitCode}}").stdout)
        return took, code

    def remove_all(self) -> None:
        for name in self.names:
            self.podman.run("rm", "-f", "-t", "0", name, check=False)


@pytest.fixture
def containers(podman: Podman, forgeline_image: BuildResult) -> Iterator[Containers]:
    running = Containers(podman, forgeline_image.tag)
    yield running
    running.remove_all()


def _wait_ready(url: str, timeout_s: float, logs: Callable[[], str]) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url}/readyz not 200 within {timeout_s} s:\n{logs()[-3000:]}")


def test_image_is_small_non_root_and_carries_no_torch_or_secret(
    podman: Podman, forgeline_image: BuildResult, record_figure: RecordFigure
) -> None:
    """The image stays under its size guard, runs as uid 10001 under tini, has no torch or CA."""
    assert forgeline_image.size_bytes / 1e6 <= SIZE_LIMIT_MB
    # What a registry stores and a node pulls: the gzipped layers.
    archive = podman.run_bytes("save", "--format", "docker-archive", forgeline_image.tag)
    record_figure("image_compressed_mb", len(gzip.compress(archive, compresslevel=6)) / 1e6)
    image = json.loads(podman.run("image", "inspect", forgeline_image.tag).stdout)[0]
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["tini", "--", "forgeline"]
    assert config["Cmd"] == ["api"]
    assert "/healthz" in open_healthcheck_script(podman, forgeline_image.tag)
    assert image["Healthcheck"]["Test"] == ["CMD", "python", "/opt/forgeline/healthcheck.py"]
    probe = (
        "import importlib.util, os, pathlib; "
        "print(importlib.util.find_spec('torch') is None, "
        "os.path.exists('/run/secrets/ca'), "
        "pathlib.Path('/opt/forgeline/lib').exists())"
    )
    out = podman.run(
        "run", "--rm", "--entrypoint", "python", forgeline_image.tag, "-c", probe
    ).stdout.split()
    assert out == ["True", "False", "True"]
    history = podman.run("history", "--no-trunc", forgeline_image.tag).stdout
    assert "BEGIN CERTIFICATE" not in history


def open_healthcheck_script(podman: Podman, tag: str) -> str:
    """The HEALTHCHECK script as it is in the image."""
    return podman.run(
        "run", "--rm", "--entrypoint", "cat", tag, "/opt/forgeline/healthcheck.py"
    ).stdout


def test_hardened_api_and_worker_run_a_job_and_stop_within_the_drain_budget(
    containers: Containers, podman: Podman, database_url: str, record_figure: RecordFigure
) -> None:
    """migrate, api and worker from one image, read-only, no capabilities: run a job, drain."""
    port = free_port()
    admin_key = f"fl_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    # As in every deploy file: secrets from the environment, nothing written
    # to the read-only root, artifacts in the tmpfs podman mounts on /tmp.
    env = {
        "FORGELINE_DATABASE_URL": database_url,
        "FORGELINE_STORAGE_URL": "file:///tmp/artifacts",
        "FORGELINE_PORT": str(port),
        "FORGELINE_SECRET_KEY": secrets.token_urlsafe(48),
        "FORGELINE_ADMIN_KEY": admin_key,
        "FORGELINE_OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
    }
    auth = {"Authorization": f"Bearer {admin_key}"}
    assert "schema is current" in containers.run_once("migrate", env)

    started = time.monotonic()
    api = containers.start("api", env)
    url = f"http://127.0.0.1:{port}"
    record_figure(
        "container_start_to_ready_s",
        _wait_ready(url, timeout_s=60, logs=lambda: podman.run("logs", api).stderr),
    )
    # The worker needs no API key; as in the deploy files, only the api gets one.
    worker_env = {k: v for k, v in env.items() if k != "FORGELINE_ADMIN_KEY"}
    worker = containers.start("worker", {**worker_env, "FORGELINE_METRICS_PORT": str(free_port())})

    assert podman.run("healthcheck", "run", api, check=False).returncode == 0
    # The worker's probe server answers the same health check on its own port.
    deadline = time.monotonic() + 60
    while podman.run("healthcheck", "run", worker, check=False).returncode != 0:
        assert time.monotonic() < deadline, podman.run("logs", worker).stderr[-3000:]
        time.sleep(0.2)
    assert podman.run("exec", api, "id", "-u").stdout.strip() == "10001"
    assert podman.run("exec", worker, "id", "-u").stdout.strip() == "10001"
    # Read-only root: nothing outside the tmpfs mounts can be written.
    write = podman.run("exec", api, "touch", "/opt/forgeline/x", check=False)
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr

    job = httpx.post(
        f"{url}/api/v1/jobs", json={"pipeline": "echo", "input": {"text": "hi"}}, headers=auth
    )
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    deadline = time.monotonic() + 60
    status = "queued"
    while time.monotonic() < deadline and status in ("queued", "running"):
        status = httpx.get(f"{url}/api/v1/jobs/{job_id}", headers=auth).json()["status"]
        time.sleep(0.1)
    assert status == "succeeded", podman.run("logs", worker).stderr[-3000:]
    record_figure("first_job_after_start_s", time.monotonic() - started)

    # SIGTERM through tini: both drain and exit 0, well inside the budget
    # (a SIGKILL after the grace period would show as exit code 137).
    for name in (api, worker):
        took, code = containers.stop(name, grace_s=DRAIN_BUDGET_S + 10)
        assert code == 0, podman.run("logs", name).stderr[-3000:]
        assert took < DRAIN_BUDGET_S
        record_figure(f"sigterm_to_exit_{name.split('-')[1]}_s", took)
