"""Sentry and OpenTelemetry: silent unless configured, reporting when they are."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.acceptance.conftest import ProcessFactory
from tests.acceptance.test_production_api import wait_final
from tests.support.auth import AUTH
from tests.support.capture import CaptureServer
from tests.support.processes import ForgelineProcess

CANARY = "sk-canary-4b1d9e7a22"
CRASH = "tests.support.pipelines:CrashPipeline"


def crash_and_browse(serve: ForgelineProcess) -> None:
    """A pipeline bug (an error worth reporting) and a few traced requests."""
    job = httpx.post(
        f"{serve.url}/api/v1/jobs", headers=AUTH, json={"pipeline": "crash", "input": {}}, timeout=5
    ).json()
    assert wait_final(serve, job["id"])["status"] == "failed"
    for _ in range(3):
        httpx.get(f"{serve.url}/api/v1/jobs/{job['id']}", headers=AUTH, timeout=5)


def test_without_their_variables_nothing_is_sent(
    start_forgeline: ProcessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No SENTRY_DSN, no OTEL endpoint: a crash and requests send nothing anywhere."""
    for name in ("SENTRY_DSN", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    with CaptureServer() as collector:
        serve = start_forgeline("serve", pipelines=CRASH)
        crash_and_browse(serve)
        assert serve.stop() == 0
        time.sleep(0.5)
        assert collector.requests == []
        assert "sentry on" not in serve.output()
        assert "tracing on" not in serve.output()


@pytest.mark.slow
def test_with_their_variables_errors_and_traces_are_reported(
    start_forgeline: ProcessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SENTRY_DSN gets the crash (without the secret in its locals); OTLP gets the spans."""
    with CaptureServer() as collector:
        monkeypatch.setenv("SENTRY_DSN", f"http://public@127.0.0.1:{collector.port}/1")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "forgeline-test")
        serve = start_forgeline("serve", pipelines=CRASH, openai_api_key=CANARY)
        crash_and_browse(serve)
        assert serve.stop() == 0  # shutdown flushes both

        envelopes = [r for r in collector.requests if r.path == "/api/1/envelope/"]
        traces = [r for r in collector.requests if r.path == "/v1/traces"]
        assert any(b"ZeroDivisionError" in envelope.body for envelope in envelopes)
        assert all(CANARY.encode() not in envelope.body for envelope in envelopes)
        assert traces, collector.paths()
        assert any(b"/api/v1/jobs/{job_id}" in trace.body for trace in traces)
        assert any(b"forgeline-test" in trace.body for trace in traces)
