"""deploy/nginx/nginx.conf in front of real forgeline api and worker processes."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FAST_TIMINGS
from tests.deploy.nginx import Nginx
from tests.support.processes import ForgelineProcess, forgeline_env, free_port, settings_env
from tests.support.sse import read_events

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[tuple[Nginx, dict[str, str]]]:
    """An api and a worker on this test's database, nginx over TLS in front."""
    admin_key = f"fl_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    port = free_port()
    env = forgeline_env(
        settings_env(
            database_url=database_url,
            data_dir=tmp_path / "data",
            storage_url=(tmp_path / "artifacts").as_uri(),
            port=port,
            secret_key=secrets.token_urlsafe(48),
            admin_key=admin_key,
            trusted_proxies="127.0.0.1",
            openai_base_url="http://127.0.0.1:9/v1",
            **FAST_TIMINGS,
        )
    )
    api = ForgelineProcess(["api"], env, tmp_path / "api.log", port=port).start()
    # The worker needs no API key; as in the deploy files, only the api gets one.
    worker_env = {k: v for k, v in env.items() if k != "FORGELINE_ADMIN_KEY"}
    worker = ForgelineProcess(["worker"], worker_env, tmp_path / "worker.log").start()
    nginx = Nginx(tmp_path / "nginx", free_port(), free_port())
    try:
        # Generous: the first import of forgeline takes seconds on a busy machine.
        api.wait_ready(timeout_s=120)
        nginx.start(f"127.0.0.1:{port}")
        yield nginx, {"Authorization": f"Bearer {admin_key}"}
    finally:
        nginx.stop()
        api.stop()
        worker.stop()


def test_tls_proxy_streams_a_job_and_sets_the_headers(
    stack: tuple[Nginx, dict[str, str]],
) -> None:
    """Over TLS through nginx: a job is submitted, streams to its final event, headers are set."""
    nginx, auth = stack
    with httpx.Client(
        base_url=nginx.https_url, verify=nginx.tls_context, headers=auth, timeout=10
    ) as client:
        job = client.post("/api/v1/jobs", json={"pipeline": "echo", "input": {"text": "tls"}})
        assert job.status_code == 201, job.text
        # Each header once (nginx's copy replaces forgeline's own).
        assert job.headers["strict-transport-security"] == "max-age=63072000; includeSubDomains"
        assert job.headers["x-content-type-options"] == "nosniff"
        assert job.headers["x-frame-options"] == "DENY"
        assert "server" not in job.headers or "/" not in job.headers["server"]
        url = f"/api/v1/jobs/{job.json()['id']}/events"
        kinds = [event.type for event in read_events(client, url)]
        assert kinds[-1] == "final", kinds
        assert client.get(f"/api/v1/jobs/{job.json()['id']}").json()["status"] == "succeeded"


def test_plain_http_redirects_and_limits_hold(stack: tuple[Nginx, dict[str, str]]) -> None:
    """HTTP answers 301 to HTTPS (probe excepted); big bodies get 413; /metrics stays inside."""
    nginx, auth = stack
    plain = httpx.get(f"http://127.0.0.1:{nginx.http_port}/api/v1/jobs", timeout=5)
    assert plain.status_code == 301
    assert plain.headers["location"] == "https://127.0.0.1/api/v1/jobs"
    assert httpx.get(f"http://127.0.0.1:{nginx.http_port}/healthz", timeout=5).status_code == 200
    with httpx.Client(
        base_url=nginx.https_url, verify=nginx.tls_context, headers=auth, timeout=10
    ) as client:
        big = client.post(
            "/api/v1/jobs",
            content=b"x" * (11 * 1024 * 1024),
            headers={"Content-Type": "application/json"},
        )
        assert big.status_code == 413
        assert client.get("/metrics").status_code == 404
        assert client.get("/healthz").json() == {"status": "ok"}
