"""``forgeline serve`` as an operator runs it: a subprocess on HTTP, with a real model server."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.acceptance.conftest import ProcessFactory
from tests.support.auth import AUTH
from tests.support.openai_server import OpenAIServer
from tests.support.processes import ForgelineProcess

PROMPT = "a lighthouse keeper finds a door in the sea"
FINAL_STATUSES = {"succeeded", "failed", "cancelled"}


def wait_for_job(process: ForgelineProcess, job_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """Poll the job until it is final; fail with the server's output if it never is."""
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = httpx.get(f"{process.url}/api/v1/jobs/{job_id}", headers=AUTH, timeout=5).json()
        if job["status"] in FINAL_STATUSES:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not final after {timeout_s} s: {job}\n{process.output()}")


def submit(process: ForgelineProcess, pipeline: str, job_input: dict[str, Any]) -> dict[str, Any]:
    """Submit a job and return it as the API answered."""
    response = httpx.post(
        f"{process.url}/api/v1/jobs",
        headers=AUTH,
        json={"pipeline": pipeline, "input": job_input},
        timeout=5,
    )
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def test_story_job_returns_what_the_model_streamed(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """A story job succeeds with the model's text, and its story.md downloads with that text."""
    serve = start_forgeline("serve")

    job = wait_for_job(serve, submit(serve, "story", {"prompt": PROMPT})["id"])

    assert job["status"] == "succeeded", job
    text = job["result"]["text"]
    assert text == openai_server.replies[-1]
    assert PROMPT in text  # the prompt reached the model server
    [artifact] = job["artifacts"]
    assert artifact["name"] == "story.md"
    download = httpx.get(f"{serve.url}{artifact['url']}", headers=AUTH, timeout=5)
    assert download.status_code == 200
    assert download.headers["content-type"].startswith("text/markdown")
    assert download.text == f"# {PROMPT}\n\n{text.strip()}\n"
    assert artifact["size"] == len(download.content)


def test_probes_and_pipeline_listing(start_forgeline: ProcessFactory) -> None:
    """/healthz, /readyz (with each check's detail) and the pipeline listing answer 200."""
    serve = start_forgeline("serve")

    assert httpx.get(f"{serve.url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = httpx.get(f"{serve.url}/readyz", timeout=5)
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert set(checks) == {"database", "queue", "storage", "backend:openai"}
    assert all(check["ok"] and check["detail"] for check in checks.values()), checks
    listing = httpx.get(f"{serve.url}/api/v1/pipelines", headers=AUTH, timeout=5)
    assert listing.status_code == 200
    pipelines = {item["name"]: item for item in listing.json()["items"]}
    assert {"story", "echo"} <= set(pipelines)
    assert pipelines["story"]["input_schema"]["required"] == ["prompt"]
    assert "text" in pipelines["echo"]["input_schema"]["properties"]


def test_readyz_stays_200_when_the_model_server_is_down(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer
) -> None:
    """With the model server gone, /readyz is still 200 but reports backend:openai failing."""
    serve = start_forgeline("serve")
    openai_server.stop()

    deadline = time.monotonic() + 10
    while True:
        ready = httpx.get(f"{serve.url}/readyz", timeout=5)
        backend = ready.json()["checks"]["backend:openai"]
        if not backend["ok"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert backend["ok"] is False
    assert backend["critical"] is False
    assert openai_server.base_url in backend["detail"]


def test_client_errors_use_the_error_envelope(start_forgeline: ProcessFactory) -> None:
    """Unknown pipeline 404 (listing known ones), invalid input 422 per field, bad JSON 400."""
    serve = start_forgeline("serve")
    jobs_url = f"{serve.url}/api/v1/jobs"

    unknown = httpx.post(jobs_url, headers=AUTH, json={"pipeline": "poem", "input": {}}, timeout=5)
    invalid = httpx.post(
        jobs_url, headers=AUTH, json={"pipeline": "story", "input": {"max_tokens": 0}}, timeout=5
    )
    malformed = httpx.post(
        jobs_url,
        content=b'{"pipeline": ',
        headers={**AUTH, "content-type": "application/json"},
    )

    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found"
    assert {"story", "echo"} <= set(unknown.json()["error"]["details"]["known"])
    assert "story" in unknown.json()["error"]["message"]
    assert invalid.status_code == 422
    fields = {tuple(d["loc"]) for d in invalid.json()["error"]["details"]}
    assert fields == {("input", "prompt"), ("input", "max_tokens")}
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "malformed_json"


@pytest.mark.parametrize(
    ("backend_max_retries", "attempts"),
    [
        pytest.param(2, 1, id="backend-retry"),
        pytest.param(0, 2, id="job-retry"),
    ],
)
def test_job_survives_a_500_before_the_first_token(
    start_forgeline: ProcessFactory,
    openai_server: OpenAIServer,
    backend_max_retries: int,
    attempts: int,
) -> None:
    """A 500 before any text is retried (by the backend, else by the job) and the job succeeds."""
    serve = start_forgeline("serve", backend_max_retries=backend_max_retries)
    openai_server.fail_next(1, status=500)

    job = wait_for_job(serve, submit(serve, "story", {"prompt": PROMPT})["id"])

    assert job["status"] == "succeeded", job
    assert job["attempts"] == attempts
    assert openai_server.request_count == 2
    assert job["result"]["text"] == openai_server.replies[-1]


@pytest.fixture
def embedded_pgdata(tmp_path: Path) -> Path:
    """Where serve keeps its embedded PostgreSQL (start_forgeline stops one left running)."""
    return tmp_path / "data" / "postgres"


def test_sigterm_stops_serve_and_its_embedded_database(
    start_forgeline: ProcessFactory, embedded_pgdata: Path
) -> None:
    """SIGTERM drains `forgeline serve`, stops the PostgreSQL it started, and exits 0."""
    serve = start_forgeline("serve", database_url=None, storage_url=None)
    assert (embedded_pgdata / "postmaster.pid").exists()

    serve.signal(signal.SIGTERM)

    assert serve.process.wait(timeout=30) == 0, serve.output()
    assert not (embedded_pgdata / "postmaster.pid").exists()


@pytest.mark.slow
def test_embedded_database_keeps_jobs_across_restarts(
    start_forgeline: ProcessFactory, embedded_pgdata: Path
) -> None:
    """Without a database URL, serve runs jobs on its own PostgreSQL and finds them again later."""
    first = start_forgeline("serve", database_url=None, storage_url=None)
    job = wait_for_job(first, submit(first, "echo", {"text": "kept"})["id"])
    assert job["status"] == "succeeded", job
    assert job["result"] == {"text": "kept"}
    first.signal(signal.SIGTERM)
    first.process.wait(timeout=30)
    assert "forgeline stopped" in first.output()

    second = start_forgeline("serve", database_url=None, storage_url=None)
    listed = httpx.get(f"{second.url}/api/v1/jobs", headers=AUTH, timeout=5).json()["items"]

    assert [item["id"] for item in listed] == [job["id"]]
    assert listed[0]["status"] == "succeeded"
    assert (embedded_pgdata / "PG_VERSION").exists()
