"""The production API across processes: shared rate limits, per-process metrics, clean logs."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.conftest import ProcessFactory
from tests.support.auth import AUTH
from tests.support.processes import ForgelineProcess, free_port

CANARY = "sk-canary-7f3c9e1d5b"
REDIS_URL = "redis://127.0.0.1:6379/0"


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_final(process: ForgelineProcess, job_id: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(
            f"{process.url}/api/v1/jobs/{job_id}", headers=AUTH, timeout=5
        ).json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not final after {timeout_s} s")


def _hammer(urls: list[str], key: str, count: int) -> list[int]:
    """One client process: ``count`` concurrent GETs spread over ``urls``."""

    async def run() -> list[int]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(headers=headers, timeout=30) as client:
            answers = await asyncio.gather(
                *(client.get(f"{urls[i % len(urls)]}/api/v1/jobs") for i in range(count))
            )
        return [answer.status_code for answer in answers]

    return asyncio.run(run())


@pytest.mark.slow
def test_a_rate_limit_holds_exactly_across_replicas_sharing_redis(
    start_forgeline: ProcessFactory,
) -> None:
    """200 concurrent requests from 4 processes through 2 API replicas, 30/min: exactly 30."""
    replicas = [
        start_forgeline("api", redis_url=REDIS_URL, rate_limit_per_key="30/minute")
        for _ in range(2)
    ]
    # A fresh key: its bucket in the shared Redis is empty whatever ran before.
    made = httpx.post(
        f"{replicas[0].url}/api/v1/admin/keys", headers=AUTH, json={"name": "hammer"}, timeout=5
    )
    key = made.json()["key"]
    urls = [replica.url for replica in replicas]

    with ProcessPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_hammer, [urls] * 4, [key] * 4, [50] * 4))
    codes = [code for result in results for code in result]

    assert len(codes) == 200
    assert codes.count(200) == 30
    assert codes.count(429) == 170
    readiness = httpx.get(f"{replicas[1].url}/readyz", timeout=5).json()
    assert readiness["checks"]["redis"]["ok"] is True


def test_metrics_are_counted_by_the_process_that_did_the_work(
    start_forgeline: ProcessFactory,
) -> None:
    """API counts submissions, the worker (on its own port) finished jobs and backend calls."""
    api = start_forgeline("api")
    port = free_port()
    worker = start_forgeline("worker", metrics_port=port)
    worker_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{worker_url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.1)

    body = {"pipeline": "story", "input": {"prompt": "a door in the sea"}}
    job = httpx.post(f"{api.url}/api/v1/jobs", headers=AUTH, json=body, timeout=5).json()
    assert wait_final(api, job["id"])["status"] == "succeeded"

    api_metrics = httpx.get(f"{api.url}/metrics", timeout=5).text
    worker_metrics = httpx.get(f"{worker_url}/metrics", timeout=5).text
    assert metric(api_metrics, "forgeline_jobs_submitted_total", pipeline="story") == 1
    assert metric(api_metrics, "forgeline_jobs_finished_total", pipeline="story") == 0
    finished = {"pipeline": "story", "status": "succeeded"}
    assert metric(worker_metrics, "forgeline_jobs_finished_total", **finished) == 1
    assert metric(worker_metrics, "forgeline_backend_requests_total", outcome="ok") == 1
    assert metric(worker_metrics, "forgeline_tokens_generated_total", backend="openai") > 0
    assert metric(worker_metrics, "forgeline_backend_ttft_seconds_count", backend="openai") == 1
    assert httpx.get(f"{worker_url}/readyz", timeout=5).status_code == 200


def test_a_canary_secret_never_reaches_the_logs(start_forgeline: ProcessFactory) -> None:
    """A crash with the secret in a local variable, bad keys, a doctor-like start: no canary."""
    serve = start_forgeline(
        "serve",
        openai_api_key=CANARY,
        pipelines="tests.support.pipelines:CrashPipeline",
        log_level="debug",
    )
    job = httpx.post(
        f"{serve.url}/api/v1/jobs", headers=AUTH, json={"pipeline": "crash", "input": {}}, timeout=5
    ).json()
    final = wait_final(serve, job["id"])
    httpx.get(f"{serve.url}/api/v1/jobs", headers={"Authorization": f"Bearer {CANARY}"}, timeout=5)
    serve.stop()

    output = serve.output()
    assert final["status"] == "failed"
    assert final["error"]["code"] == "pipeline_error"
    assert "ZeroDivisionError" in output  # the traceback was logged...
    assert CANARY not in output  # ...without the secret it held
    assert '"action": "http_request"' in output
