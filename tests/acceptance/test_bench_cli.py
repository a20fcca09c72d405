"""`forgeline bench` as a subprocess against a real forgeline and a real model server.

The model server is paced or made to fail on purpose, and the tests check
that the verdicts and the exit status follow the thresholds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from forgeline.benchmark.runner import DEFAULT_STORY_INPUT
from forgeline.pipelines.story import StoryInput, build_prompt
from tests.acceptance.conftest import EnvFactory, ProcessFactory
from tests.conftest import FAST_TIMINGS
from tests.support.openai_server import OpenAIServer, story_pieces
from tests.support.postgres import DatabaseFactory
from tests.support.processes import (
    ForgelineProcess,
    forgeline_env,
    free_port,
    run_cli,
    settings_env,
)

#: Words in the story the test model server tells for the benchmark's default prompt.
STORY_WORDS = len(
    "".join(story_pieces(build_prompt(StoryInput.model_validate(DEFAULT_STORY_INPUT)))).split()
)
#: Seconds between the model's words: each story takes about a second.
PACED_S = 0.04
#: Slower still, so that jobs sent together surely overlap on a busy machine.
OVERLAP_PACED_S = 0.1
#: Thresholds of tests that are not about concurrency: how many jobs overlap
#: on a loaded machine is not theirs to check.
ANY_CONCURRENCY = {"min_concurrency": 1}
#: Bound on how long a cancelled job may take to say so.
CANCEL_BOUND_S = 10.0
#: Bound on a bench process starting and sending its jobs (imports are slow on a busy machine).
START_BOUND_S = 60.0
#: The admin key the forgeline under test accepts (FORGELINE_ADMIN_KEY).
ADMIN_KEY = "fl_0be4c0de_" + "k" * 43


def bench(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `forgeline bench ARGS` to completion."""
    return run_cli(["bench", *args], env, timeout_s=120)


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    """Everything the command printed, for assertion messages."""
    return result.stdout + result.stderr


def assert_one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    """Exit status 2 and a single `error:` line containing ``text``, no traceback."""
    assert result.returncode == 2, output_of(result)
    assert "Traceback" not in output_of(result)
    assert result.stderr.startswith("error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert text in result.stderr, result.stderr


def write_toml(path: Path, **values: float) -> Path:
    """A thresholds file setting ``values``."""
    path.write_text("".join(f"{name} = {value}\n" for name, value in values.items()))
    return path


@pytest.fixture(scope="module")
def model_server() -> Iterator[OpenAIServer]:
    """The model server behind the module's forgeline; each test sets its pace."""
    with OpenAIServer() as server:
        yield server


@pytest.fixture(scope="module")
def shared_forgeline(
    databases: DatabaseFactory, tmp_path_factory: pytest.TempPathFactory, model_server: OpenAIServer
) -> Iterator[ForgelineProcess]:
    """One `forgeline serve` for the module (starting it is the slow part), retries off."""
    folder = tmp_path_factory.mktemp("bench-serve")
    port = free_port()
    settings = settings_env(
        database_url=databases.create(),
        data_dir=folder / "data",
        storage_url=(folder / "artifacts").as_uri(),
        backend="openai",
        openai_base_url=model_server.base_url,
        openai_model=model_server.model,
        backend_connect_timeout_s=1.0,
        backend_max_retries=0,
        admin_key=ADMIN_KEY,
        port=port,
        **FAST_TIMINGS,
    )
    process = ForgelineProcess(["serve"], forgeline_env(settings), folder / "serve.log", port=port)
    process.start().wait_ready()
    yield process
    process.stop()


@pytest.fixture
def serve(shared_forgeline: ForgelineProcess, model_server: OpenAIServer) -> ForgelineProcess:
    """The module's forgeline, its model server answering at once and failing nothing."""
    model_server.piece_delay_s = 0.0
    model_server.fail_next(0)
    return shared_forgeline


def against(serve: ForgelineProcess) -> list[str]:
    """The options that point bench at ``serve`` with a key it accepts."""
    return ["--url", serve.url, "--key", ADMIN_KEY]


def job_status(serve: ForgelineProcess, job_id: str) -> str:
    """A job's status, read from the API."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    response = httpx.get(f"{serve.url}/api/v1/jobs/{job_id}", headers=headers)
    status: str = response.json()["status"]
    return status


def settled_status(serve: ForgelineProcess, job_id: str) -> str:
    """The job's status once final, polled for at most CANCEL_BOUND_S."""
    deadline = time.monotonic() + CANCEL_BOUND_S
    status = job_status(serve, job_id)
    while status in {"queued", "running"} and time.monotonic() < deadline:
        time.sleep(0.1)
        status = job_status(serve, job_id)
    return status


def test_a_healthy_run_passes_and_writes_the_report_as_json(
    serve: ForgelineProcess,
    forgeline_environ: EnvFactory,
    model_server: OpenAIServer,
    tmp_path: Path,
) -> None:
    """Six paced stories, three at a time, pass the default gate; the JSON has every figure."""
    model_server.piece_delay_s = OVERLAP_PACED_S
    out = tmp_path / "report.json"

    result = bench(
        [*against(serve), "--jobs", "6", "--concurrency", "3", "--json", str(out)],
        forgeline_environ(),
    )

    assert result.returncode == 0, output_of(result)
    assert "verdict: pass" in result.stdout
    report = json.loads(out.read_text())
    assert report["verdict"] == "pass"
    assert report["target"] == {"url": serve.url, "in_process": False, "description": serve.url}
    assert report["summary"]["count"] == report["summary"]["succeeded"] == 6
    assert report["summary"]["success_rate"] == 1.0
    assert set(report["timings"]) == {
        "submit_s",
        "queue_wait_s",
        "ttft_s",
        "generation_s",
        "tokens_per_s",
    }
    for summary in report["timings"].values():
        assert summary["count"] == 6
        assert 0 <= summary["min"] <= summary["median"] <= summary["p95"] <= summary["max"]
    # The model needs STORY_WORDS pauses: no job can be faster.
    assert report["timings"]["generation_s"]["min"] >= STORY_WORDS * OVERLAP_PACED_S
    assert report["stress"]["peak_in_flight"] == 3
    assert report["stress"]["peak_running"] == 3
    assert {v["threshold"] for v in report["thresholds"]} >= {"max_avg_generation_s"}
    assert all(v["passed"] for v in report["thresholds"])
    for sample in report["samples"]:
        assert sample["outcome"] == "succeeded"
        assert sample["tokens"] == STORY_WORDS
        assert sample["ttft_s"] < sample["generation_s"]
        assert sample["queue_wait_s"] is not None
        assert job_status(serve, sample["job_id"]) == "succeeded"


def test_a_slow_model_fails_the_gate_and_a_looser_gate_passes_it(
    serve: ForgelineProcess,
    forgeline_environ: EnvFactory,
    model_server: OpenAIServer,
    tmp_path: Path,
) -> None:
    """Stories of over a second fail a 0.5 s average with exit 1, saying by how much."""
    model_server.piece_delay_s = PACED_S
    strict = write_toml(
        tmp_path / "strict.toml", max_avg_generation_s=0.5, max_generation_s=0.8, **ANY_CONCURRENCY
    )
    loose = write_toml(
        tmp_path / "loose.toml", max_avg_generation_s=30, max_generation_s=30, **ANY_CONCURRENCY
    )
    common = [*against(serve), "--jobs", "3", "--concurrency", "3"]

    failing = bench([*common, "--thresholds", str(strict)], forgeline_environ())
    passing = bench([*common, "--thresholds", str(loose)], forgeline_environ())

    assert failing.returncode == 1, output_of(failing)
    lines = failing.stdout.splitlines()
    average = next(line for line in lines if line.startswith("FAIL max_avg_generation_s"))
    assert "over the limit 0.50 s" in average
    assert any(line.startswith("FAIL max_generation_s") for line in lines), failing.stdout
    assert "verdict: FAIL (2 threshold(s) failed)" in failing.stdout
    assert passing.returncode == 0, output_of(passing)
    assert "verdict: pass" in passing.stdout


def test_a_failing_model_fails_the_success_rate_unless_the_gate_allows_it(
    serve: ForgelineProcess,
    forgeline_environ: EnvFactory,
    model_server: OpenAIServer,
    tmp_path: Path,
) -> None:
    """Two of five jobs failing is 60 %: under the default 80 %, over a 50 % floor."""
    json_path = tmp_path / "report.json"
    allowing = write_toml(
        tmp_path / "allowing.toml", min_success_rate=0.5, min_concurrency=1, max_error_rate=0.5
    )
    common = [*against(serve), "--jobs", "5", "--concurrency", "5", "--json", str(json_path)]

    model_server.fail_next(2, status=400)
    failing = bench(common, forgeline_environ())
    report = json.loads(json_path.read_text())
    model_server.fail_next(2, status=400)
    passing = bench([*common, "--thresholds", str(allowing)], forgeline_environ())

    assert failing.returncode == 1, output_of(failing)
    assert (
        "FAIL min_success_rate: success rate 60 % is 20 points under the minimum 80 %"
        in failing.stdout
    )
    assert report["summary"]["outcomes"] == {"failed": 2, "succeeded": 3}
    assert report["summary"]["error_codes"] == {"backend_error": 2}
    assert report["verdict"] == "fail"
    failed = [s for s in report["samples"] if s["outcome"] == "failed"]
    assert all("answered 400" in s["error_message"] for s in failed), failed
    assert passing.returncode == 0, output_of(passing)


def test_a_job_past_the_timeout_is_counted_and_cancelled(
    serve: ForgelineProcess,
    forgeline_environ: EnvFactory,
    model_server: OpenAIServer,
    tmp_path: Path,
) -> None:
    """A story that would take 10 s times out after 1 s, fails the gate, and is cancelled."""
    model_server.piece_delay_s = 10 / STORY_WORDS
    json_path = tmp_path / "report.json"

    args = [*against(serve), "--jobs", "1", "--concurrency", "1", "--timeout-s", "1"]

    result = bench([*args, "--json", str(json_path)], forgeline_environ())

    assert result.returncode == 1, output_of(result)
    assert json_path.exists(), output_of(result)
    (sample,) = json.loads(json_path.read_text())["samples"]
    assert (sample["outcome"], sample["error_code"]) == ("timeout", "timeout")
    assert settled_status(serve, sample["job_id"]) == "cancelled"


def test_ctrl_c_cancels_the_jobs_still_running(
    serve: ForgelineProcess, model_server: OpenAIServer
) -> None:
    """SIGINT mid-run exits 130 and leaves none of the run's jobs running on the server."""
    model_server.piece_delay_s = START_BOUND_S / STORY_WORDS
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    bench_process = subprocess.Popen(
        [sys.executable, "-m", "forgeline", "bench", *against(serve), "--jobs", "2"],
        env=forgeline_env({}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        running: list[dict[str, Any]] = []
        deadline = time.monotonic() + START_BOUND_S
        while len(running) < 2 and time.monotonic() < deadline:
            listed = httpx.get(f"{serve.url}/api/v1/jobs?status=running", headers=headers)
            running = listed.json()["items"]
            time.sleep(0.1)
        assert len(running) == 2, running
        bench_process.send_signal(signal.SIGINT)
        assert bench_process.wait(timeout=START_BOUND_S) == 130
    finally:
        if bench_process.poll() is None:
            bench_process.kill()
    assert [settled_status(serve, job["id"]) for job in running] == ["cancelled", "cancelled"]


def test_a_ramp_spreads_the_starts_over_the_ramp_time(
    serve: ForgelineProcess,
    forgeline_environ: EnvFactory,
    model_server: OpenAIServer,
    tmp_path: Path,
) -> None:
    """With --ramp-s 1 at concurrency 3, the third job is not sent before about a second."""
    model_server.piece_delay_s = PACED_S
    json_path = tmp_path / "report.json"
    loose = write_toml(tmp_path / "loose.toml", **ANY_CONCURRENCY)

    args = [*against(serve), "--jobs", "3", "--concurrency", "3", "--ramp-s", "1"]

    result = bench(
        [*args, "--json", str(json_path), "--thresholds", str(loose)], forgeline_environ()
    )

    assert result.returncode == 0, output_of(result)
    report = json.loads(json_path.read_text())
    sent = sorted(sample["sent_at_s"] for sample in report["samples"])
    assert sent[1] >= 0.5
    assert sent[2] >= 1.0
    assert report["ramp_s"] == 1.0


def test_compare_shows_regressions_and_can_fail_on_them(
    serve: ForgelineProcess,
    forgeline_environ: EnvFactory,
    model_server: OpenAIServer,
    tmp_path: Path,
) -> None:
    """Against a baseline ten times faster, generation time regresses; the flag makes it fail."""
    model_server.piece_delay_s = PACED_S
    first = tmp_path / "first.json"
    lenient = write_toml(tmp_path / "lenient.toml", **ANY_CONCURRENCY)
    common = [*against(serve), "--jobs", "3", "--concurrency", "3", "--thresholds", str(lenient)]
    assert bench([*common, "--json", str(first)], forgeline_environ()).returncode == 0
    baseline: dict[str, Any] = json.loads(first.read_text())
    for statistic in ("min", "median", "avg", "p95", "max"):
        baseline["timings"]["generation_s"][statistic] /= 10
    baseline_path = tmp_path / "baseline.json"
    baseline_path.write_text(json.dumps(baseline))
    second = tmp_path / "second.json"

    shown = bench([*common, "--compare", str(baseline_path)], forgeline_environ())
    gated = bench(
        [*common, "--compare", str(baseline_path), "--fail-on-regression", "--json", str(second)],
        forgeline_environ(),
    )

    assert shown.returncode == 0, output_of(shown)
    assert "compared with baseline.json" in shown.stdout
    assert "REGRESSION generation_s.avg" in shown.stdout
    assert gated.returncode == 1, output_of(gated)
    assert "regression(s))" in gated.stdout
    comparison = json.loads(second.read_text())["comparison"]
    regressed = {c["figure"] for c in comparison["changes"] if c["regression"]}
    assert "generation_s.avg" in regressed
    assert "success_rate" not in regressed


def test_submits_the_server_sheds_are_counted_as_rejected(
    start_forgeline: ProcessFactory,
    forgeline_environ: EnvFactory,
    openai_server: OpenAIServer,
    tmp_path: Path,
) -> None:
    """Over the per-key active-job limit, a submit's 429 is a rejected job, not a crash."""
    openai_server.piece_delay_s = PACED_S
    limited = start_forgeline("serve", admin_key=ADMIN_KEY, max_active_jobs_per_key=2)
    json_path = tmp_path / "report.json"
    args = ["--url", limited.url, "--key", ADMIN_KEY, "--jobs", "4", "--concurrency", "4"]

    result = bench([*args, "--json", str(json_path)], forgeline_environ())

    assert result.returncode == 1, output_of(result)
    summary = json.loads(json_path.read_text())["summary"]
    assert summary["outcomes"]["succeeded"] >= 2
    assert summary["outcomes"].get("rejected", 0) >= 1
    assert summary["error_codes"] == {"rate_limited": summary["outcomes"]["rejected"]}


def test_a_pipeline_or_input_the_server_refuses_is_one_clear_error(
    serve: ForgelineProcess, forgeline_environ: EnvFactory, model_server: OpenAIServer
) -> None:
    """An unknown pipeline, or input the pipeline refuses, stops the run before any job runs."""
    asked_before = model_server.request_count
    unknown = bench([*against(serve), "--pipeline", "nope"], forgeline_environ())
    refused = bench(
        [*against(serve), "--jobs", "2", "--input", '{"prompt": "x", "colour": "red"}'],
        forgeline_environ(),
    )

    assert_one_line_error(unknown, "unknown pipeline 'nope'")
    assert "echo, story" in unknown.stderr
    assert_one_line_error(refused, "refused the job: invalid input for pipeline 'story'")
    assert "input.colour" in refused.stderr
    assert model_server.request_count == asked_before


@pytest.mark.parametrize(
    ("url", "says"),
    [
        pytest.param("nothing-listens", "cannot reach forgeline", id="nothing-listens"),
        pytest.param("model-server", "is not a forgeline API", id="not-forgeline"),
        pytest.param("localhost:8000", "--url must be an http:// or https:// URL", id="no-scheme"),
    ],
)
def test_a_wrong_url_is_one_clear_error(
    forgeline_environ: EnvFactory, openai_server: OpenAIServer, url: str, says: str
) -> None:
    """A URL where nothing listens, where something else answers, or with no scheme: exit 2."""
    targets = {
        "nothing-listens": f"http://127.0.0.1:{free_port()}",
        "model-server": f"http://{openai_server.host}:{openai_server.port}",
    }

    result = bench(["--url", targets.get(url, url)], forgeline_environ())

    assert_one_line_error(result, says)


class _Refusing(BaseHTTPRequestHandler):
    """Answers every request with the status in ``server.status`` and an error envelope."""

    def do_GET(self) -> None:
        server: _RefusingServer = self.server  # type: ignore[assignment]
        server.authorizations.append(self.headers.get("Authorization"))
        body = json.dumps(
            {"error": {"code": "unauthorized", "message": "invalid API key", "details": None}}
        ).encode()
        self.send_response(server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _RefusingServer(ThreadingHTTPServer):
    def __init__(self, status: int) -> None:
        super().__init__(("127.0.0.1", 0), _Refusing)
        self.status = status
        self.authorizations: list[str | None] = []


@pytest.fixture(params=[401, 403])
def refusing_server(request: pytest.FixtureRequest) -> Iterator[_RefusingServer]:
    """An API that refuses every key, the way forgeline's key check answers."""
    server = _RefusingServer(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_a_refused_key_is_one_clear_error(
    forgeline_environ: EnvFactory, refusing_server: _RefusingServer
) -> None:
    """--key goes out as a Bearer token; a 401 or 403 stops the run, with or without a key."""
    url = f"http://127.0.0.1:{refusing_server.server_address[1]}"
    status = refusing_server.status

    wrong = bench(["--url", url, "--key", "fl-wrong-key"], forgeline_environ())
    missing = bench(["--url", url], forgeline_environ())

    assert_one_line_error(wrong, f"rejected the API key (HTTP {status}: invalid API key)")
    assert "fl-wrong-key" not in wrong.stderr
    assert_one_line_error(missing, "requires an API key")
    assert "--key" in missing.stderr
    assert refusing_server.authorizations == ["Bearer fl-wrong-key", None]


def test_a_key_forgeline_does_not_know_is_one_clear_error(
    serve: ForgelineProcess, forgeline_environ: EnvFactory, model_server: OpenAIServer
) -> None:
    """forgeline answers 401 to an unknown key; bench stops before any job runs."""
    asked_before = model_server.request_count
    result = bench(["--url", serve.url, "--key", "fl_deadbeef_" + "x" * 43], forgeline_environ())

    assert_one_line_error(result, "rejected the API key (HTTP 401: ")
    assert model_server.request_count == asked_before


def test_in_process_runs_the_same_benchmark_on_a_server_it_starts(
    forgeline_environ: EnvFactory, openai_server: OpenAIServer, tmp_path: Path
) -> None:
    """Without --url, bench serves forgeline itself on a free port and reports as usual."""
    openai_server.piece_delay_s = PACED_S
    json_path = tmp_path / "report.json"
    lenient = str(write_toml(tmp_path / "lenient.toml", **ANY_CONCURRENCY))

    result = bench(
        ["--jobs", "3", "--concurrency", "3", "--json", str(json_path), "--thresholds", lenient],
        forgeline_environ(backend="openai"),
    )

    assert result.returncode == 0, output_of(result)
    assert "starting forgeline in-process" in result.stderr
    report = json.loads(json_path.read_text())
    assert report["target"]["in_process"] is True
    assert report["target"]["url"].startswith("http://127.0.0.1:")
    assert report["summary"]["succeeded"] == 3
    assert openai_server.request_count == 3


@pytest.mark.slow
def test_in_process_on_the_embedded_database(
    forgeline_environ: EnvFactory, openai_server: OpenAIServer, tmp_path: Path
) -> None:
    """With no database configured, bench starts the embedded PostgreSQL and runs on it."""
    from tests.acceptance.conftest import stop_embedded_postgres

    json_path = tmp_path / "report.json"
    lenient = write_toml(tmp_path / "lenient.toml", **ANY_CONCURRENCY)
    args = ["--jobs", "4", "--concurrency", "4", "--thresholds", str(lenient)]
    try:
        result = bench(
            [*args, "--json", str(json_path)],
            forgeline_environ(backend="openai", database_url=None),
        )
    finally:
        stop_embedded_postgres(tmp_path / "data" / "postgres")

    assert result.returncode == 0, output_of(result)
    assert "embedded database" in result.stderr
    report = json.loads(json_path.read_text())
    assert report["summary"]["succeeded"] == 4
