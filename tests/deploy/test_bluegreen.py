"""Blue/green behind nginx under steady load, with deploy/nginx/switch-upstream.sh.

Real processes: nginx with the committed configuration over TLS, two api
versions on one database, a worker. Clients keep submitting and reading jobs
and follow long streams while the script switches blue to green and blue is
stopped; then a broken version is deployed and refused. Proof: no request
fails, every stream ends with its final event without a gap or a duplicate.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import FAST_TIMINGS
from tests.deploy.conftest import RecordFigure, repo_path
from tests.deploy.nginx import Nginx
from tests.support.processes import ForgelineProcess, forgeline_env, free_port, settings_env
from tests.support.sse import Transcript, events_url, read_events

pytestmark = pytest.mark.slow

SWITCH = repo_path("deploy", "nginx", "switch-upstream.sh")
STREAMS = 6
#: Longer than the test: the streams stay open until the test cancels their jobs.
STREAM_JOB_S = 600.0
LOAD_THREADS = 3


@dataclass
class Load:
    """Clients submitting and reading jobs through nginx until stopped."""

    client_factory: Callable[[], httpx.Client]
    stop: threading.Event = field(default_factory=threading.Event)
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        with self.client_factory() as client:
            while not self.stop.is_set():
                for method, url, body in (
                    ("POST", "/api/v1/jobs", {"pipeline": "echo", "input": {"text": "load"}}),
                    ("GET", "/readyz", None),
                ):
                    try:
                        response = client.request(method, url, json=body)
                        ok = response.status_code < 300
                        detail = f"{method} {url}: {response.status_code} {response.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, detail = False, f"{method} {url}: {exc!r}"
                    with self.lock:
                        self.requests += 1
                        if not ok:
                            self.failures.append(detail)
                time.sleep(0.05)


def _follow(
    client_factory: Callable[[], httpx.Client],
    job_id: str,
    transcript: Transcript,
    errors: list[str],
) -> None:
    """Follow a job's stream to its final event, resuming after each disconnect."""
    deadline = time.monotonic() + 90
    with client_factory() as client:
        while transcript.final is None and time.monotonic() < deadline:
            transcript.connections += 1
            try:
                for event in read_events(
                    client, events_url("", job_id), last_event_id=transcript.last_seq or None
                ):
                    if event.seq is not None:
                        transcript.add(event)
            except (httpx.HTTPError, AssertionError) as exc:
                errors.append(f"{job_id}: {exc!r}")
                time.sleep(0.2)


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> tuple[dict[str, str], str]:
    """Settings shared by both api versions and the worker; and the admin key."""
    admin_key = f"fl_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    values = settings_env(
        database_url=database_url,
        data_dir=tmp_path / "data",
        storage_url=(tmp_path / "artifacts").as_uri(),
        secret_key=secrets.token_urlsafe(48),
        admin_key=admin_key,
        trusted_proxies="127.0.0.1",
        pipelines="tests.support.pipelines:SleepPipeline",
        rate_limit_per_key="1000000/minute",
        rate_limit_per_ip="1000000/minute",
        max_active_jobs_per_key=100000,
        # Room for the long stream jobs and the load's jobs at once.
        worker_concurrency=32,
        openai_base_url="http://127.0.0.1:9/v1",
        **FAST_TIMINGS,
    )
    return forgeline_env(values), admin_key


@pytest.fixture
def processes() -> Iterator[list[ForgelineProcess]]:
    """Every forgeline process a test starts, stopped at its end."""
    started: list[ForgelineProcess] = []
    yield started
    for process in started:
        if process.process.poll() is None:
            process.stop()


def test_switch_loses_no_request_or_stream_and_a_broken_version_is_refused(
    env: tuple[dict[str, str], str],
    processes: list[ForgelineProcess],
    tmp_path: Path,
    record_figure: RecordFigure,
) -> None:
    """Blue to green under load: 0 failed requests, 0 broken streams; a bad green is refused."""
    base_env, admin_key = env

    def api(name: str, extra: dict[str, str] | None = None) -> ForgelineProcess:
        port = free_port()
        process = ForgelineProcess(
            ["api"],
            {**base_env, "FORGELINE_PORT": str(port), **(extra or {})},
            tmp_path / f"{name}.log",
            port=port,
        ).start()
        processes.append(process)
        return process

    blue = api("blue")
    blue.wait_ready(timeout_s=120)
    worker_env = {k: v for k, v in base_env.items() if k != "FORGELINE_ADMIN_KEY"}
    worker = ForgelineProcess(["worker"], worker_env, tmp_path / "worker.log").start()
    processes.append(worker)
    nginx = Nginx(tmp_path / "nginx", free_port(), free_port())
    nginx.start(f"127.0.0.1:{blue.port}")
    try:
        auth = {"Authorization": f"Bearer {admin_key}"}

        def client() -> httpx.Client:
            return httpx.Client(
                base_url=nginx.https_url,
                verify=nginx.tls_context,
                headers=auth,
                timeout=httpx.Timeout(10, read=60),
            )

        with client() as setup:
            stream_jobs = [
                setup.post(
                    "/api/v1/jobs",
                    json={"pipeline": "sleep", "input": {"seconds": STREAM_JOB_S, "tag": str(n)}},
                ).json()["id"]
                for n in range(STREAMS)
            ]
        transcripts = {job_id: Transcript() for job_id in stream_jobs}
        stream_errors: list[str] = []
        followers = [
            threading.Thread(
                target=_follow, args=(client, job_id, transcripts[job_id], stream_errors)
            )
            for job_id in stream_jobs
        ]
        load = Load(client)
        loaders = [threading.Thread(target=load.run) for _ in range(LOAD_THREADS)]
        for thread in (*followers, *loaders):
            thread.start()
        time.sleep(1.0)

        green = api("green")
        green.wait_ready(timeout_s=120)
        script_env = {
            **os.environ,
            "FORGELINE_SMOKE_KEY": admin_key,
            "PUBLIC_URL": nginx.https_url,
            "NGINX_UPSTREAM_FILE": str(nginx.upstream_file),
            "NGINX_TEST": nginx.command("-t"),
            "NGINX_RELOAD": nginx.command("-s", "reload"),
            "SSL_CERT_FILE": str(nginx.certificate),
        }
        started = time.monotonic()
        switch = subprocess.run(
            [str(SWITCH), f"127.0.0.1:{green.port}"],
            env=script_env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        record_figure("bluegreen_switch_s", time.monotonic() - started)
        assert switch.returncode == 0, switch.stderr
        assert f"server 127.0.0.1:{green.port} " in nginx.upstream_file.read_text()
        # Blue drains: its streams end with "reconnect"; clients resume on green.
        assert all(t.final is None for t in transcripts.values())
        assert blue.stop() == 0
        time.sleep(1.0)

        # A broken version (its database does not exist) is refused; traffic stays.
        broken = api("broken", {"FORGELINE_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"})
        refused = subprocess.run(
            [str(SWITCH), f"127.0.0.1:{broken.port}"],
            env=script_env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert refused.returncode == 1, refused.stderr
        assert "green failed its smoke test" in refused.stderr
        assert f"server 127.0.0.1:{green.port} " in nginx.upstream_file.read_text()
        time.sleep(1.0)

        # End the long jobs: each stream, now on green, must get its final event.
        with client() as control:
            for job_id in stream_jobs:
                assert control.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
        load.stop.set()
        for thread in (*loaders, *followers):
            thread.join(timeout=120)
    finally:
        nginx.stop()

    record_figure("bluegreen_requests", load.requests)
    record_figure("bluegreen_failed_requests", len(load.failures))
    assert load.requests > 50
    assert load.failures == []
    for job_id, transcript in transcripts.items():
        assert transcript.final is not None, (job_id, stream_errors)
        assert transcript.final.data["status"] == "cancelled"
        # Each stream was cut when blue stopped and resumed on green.
        assert transcript.connections >= 2, job_id
    record_figure(
        "bluegreen_stream_reconnects", sum(t.connections - 1 for t in transcripts.values())
    )
    record_figure(
        "bluegreen_streams_completed", sum(t.final is not None for t in transcripts.values())
    )
