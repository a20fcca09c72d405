"""The benchmark's arithmetic: statistics, the report, thresholds, comparisons, SSE decoding."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from forgeline.benchmark import BenchmarkError
from forgeline.benchmark.command import parse_input
from forgeline.benchmark.runner import DEFAULT_STORY_INPUT
from forgeline.benchmark.stats import (
    JobSample,
    Outcome,
    build_report,
    key_figures,
    peak_overlap,
    percentile,
    summarise,
)
from forgeline.benchmark.stream import JobWatch, SseDecoder
from forgeline.benchmark.thresholds import (
    Thresholds,
    compare,
    evaluate,
    load_baseline,
    load_thresholds,
)
from forgeline.client import StreamEvent


def succeeded(index: int, generation_s: float, **fields: Any) -> JobSample:
    """A job that succeeded after ``generation_s``, first token at a tenth of it."""
    values: dict[str, Any] = {
        "submit_s": 0.01,
        "queue_wait_s": 0.02,
        "ttft_s": generation_s / 10,
        "generation_s": generation_s,
        "tokens": 90,
        "attempts": 1,
        "sent_at_s": float(index),
        "ended_at_s": index + generation_s,
        "started_at": 1000.0 + index,
        "finished_at": 1000.0 + index + generation_s,
    }
    values.update(fields)
    return JobSample(index=index, outcome=Outcome.SUCCEEDED, job_id=f"job-{index}", **values)


def failed(index: int, code: str = "backend_error") -> JobSample:
    """A job that ran and failed at once."""
    return JobSample(
        index=index,
        outcome=Outcome.FAILED,
        error_code=code,
        submit_s=0.5,
        generation_s=0.05,
        sent_at_s=float(index),
        ended_at_s=index + 0.05,
    )


def report_of(samples: list[JobSample], wall_s: float = 10.0) -> dict[str, Any]:
    """The report of a run that produced ``samples``."""
    return build_report(
        samples,
        target={"url": "http://forgeline.test", "in_process": False, "description": "test"},
        pipeline="story",
        job_input={"prompt": "p"},
        concurrency=3,
        ramp_s=0.0,
        started_at="2026-01-01T00:00:00+00:00",
        wall_s=wall_s,
    )


def overlapping(count: int, generation_s: float) -> list[JobSample]:
    """``count`` successful jobs that all ran during the same second on the server."""
    return [
        succeeded(i, generation_s, started_at=1000.0, finished_at=1000.0 + generation_s)
        for i in range(count)
    ]


# -- statistics -----------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    """p95 of 1..20 is 19, the median of 1..4 is 2: always a measured value."""
    values = [float(v) for v in range(20, 0, -1)]

    assert percentile(values, 0.95) == 19.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([7.0], 0.95) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_summarise_reports_each_statistic_and_nothing_for_no_values() -> None:
    """Min, median, average, p95 and max of the values; ``None`` each when there are none."""
    assert summarise([1.0, 2.0, 3.0, 10.0]) == {
        "count": 4,
        "min": 1.0,
        "median": 2.5,
        "avg": 4.0,
        "p95": 10.0,
        "max": 10.0,
    }
    assert summarise([]) == {
        "count": 0,
        "min": None,
        "median": None,
        "avg": None,
        "p95": None,
        "max": None,
    }


def test_peak_overlap_counts_intervals_open_at_one_instant() -> None:
    """Three nested intervals overlap; one ending as the next starts does not."""
    assert peak_overlap([(0, 10), (1, 5), (2, 3), (20, 21)]) == 3
    assert peak_overlap([(0, 1), (1, 2), (2, 3)]) == 1
    assert peak_overlap([]) == 0


def test_tokens_per_second_counts_from_the_first_token_to_the_final_event() -> None:
    """90 tokens between a first token at 1 s and the end at 4 s: 30 per second."""
    sample = succeeded(0, 4.0, ttft_s=1.0, tokens=90)

    assert sample.tokens_per_s == 30.0
    assert succeeded(0, 4.0, tokens=0).tokens_per_s is None
    assert failed(0).tokens_per_s is None


# -- the report -----------------------------------------------------------------


def test_report_counts_outcomes_rates_and_error_codes() -> None:
    """Success rate counts successes; error rate also counts a success that needed a retry."""
    samples = [
        succeeded(0, 2.0),
        succeeded(1, 2.0, errors_seen=1, attempts=2),
        failed(2),
        failed(3, "timeout"),
    ]

    report = report_of(samples)

    summary = report["summary"]
    assert (summary["count"], summary["succeeded"], summary["failed"]) == (4, 2, 2)
    assert summary["success_rate"] == 0.5
    assert summary["error_rate"] == 0.75
    assert summary["outcomes"] == {"failed": 2, "succeeded": 2}
    assert summary["error_codes"] == {"backend_error": 1, "timeout": 1}
    assert len(report["samples"]) == 4
    assert json.loads(json.dumps(report)) == report  # JSON-ready as it is


def test_report_timings_leave_failed_jobs_out_except_submit_latency() -> None:
    """A fast failure does not lower the generation time; its submit latency still counts."""
    report = report_of([succeeded(0, 2.0), succeeded(1, 4.0), failed(2)])

    assert report["timings"]["generation_s"]["avg"] == 3.0
    assert report["timings"]["generation_s"]["count"] == 2
    assert report["timings"]["submit_s"]["count"] == 3
    assert report["timings"]["submit_s"]["max"] == 0.5
    assert report["timings"]["tokens_per_s"]["count"] == 2


def test_report_stress_figures_come_from_server_and_client_intervals() -> None:
    """Jobs running at once come from the server's timestamps; throughput from the wall time."""
    samples = [*overlapping(3, 2.0), succeeded(3, 1.0, started_at=2000.0, finished_at=2001.0)]

    stress = report_of(samples, wall_s=8.0)["stress"]

    assert stress["peak_running"] == 3
    assert stress["throughput_jobs_per_s"] == 0.5
    assert stress["tokens"] == 360
    assert stress["tokens_per_s"] == 45.0
    assert stress["peak_in_flight"] == 2  # sent at 0, 1, 2, 3 s, each over 2 s


# -- thresholds -----------------------------------------------------------------


def test_defaults_are_the_story_plan_gate() -> None:
    """Average ≤ 10 s, max ≤ 15 s, ≥ 80 % success, ≥ 3 at once, TTFT p95 ≤ 5 s, errors ≤ 50 %."""
    defaults = Thresholds()

    assert defaults.max_avg_generation_s == 10.0
    assert defaults.max_generation_s == 15.0
    assert defaults.min_success_rate == 0.8
    assert defaults.min_concurrency == 3
    assert defaults.max_ttft_p95_s == 5.0
    assert defaults.max_error_rate == 0.5


def test_a_healthy_run_passes_every_default_threshold() -> None:
    """Three jobs of 2 s running together meet every default."""
    verdicts = evaluate(report_of(overlapping(3, 2.0)), Thresholds())

    assert [v.threshold for v in verdicts if not v.passed] == []
    assert len(verdicts) == 6


def test_a_slow_run_fails_naming_the_threshold_and_the_excess() -> None:
    """Jobs of 12 s and 16 s fail the average and the max, each saying by how much."""
    report = report_of([*overlapping(2, 12.0), succeeded(2, 16.0, started_at=1000.0)])

    failing = {v.threshold: v for v in evaluate(report, Thresholds()) if not v.passed}

    assert set(failing) == {"max_avg_generation_s", "max_generation_s"}
    assert failing["max_avg_generation_s"].message == (
        "average generation time 13.33 s is 3.33 s over the limit 10.00 s"
    )
    assert failing["max_generation_s"].message == (
        "max generation time 16.00 s is 1.00 s over the limit 15.00 s"
    )


def test_floors_fail_by_how_far_under_and_unmeasured_figures_fail() -> None:
    """2 of 5 succeeding is 40 points under 80 %; with no success, generation is not measured."""
    report = report_of([*overlapping(2, 1.0), failed(2), failed(3), failed(4)])
    failing = {v.threshold: v for v in evaluate(report, Thresholds()) if not v.passed}

    assert failing["min_success_rate"].message == (
        "success rate 40 % is 40 points under the minimum 80 %"
    )
    assert failing["min_concurrency"].message == (
        "jobs running at once (peak) 2 is 1 under the minimum 3"
    )

    nothing = {v.threshold: v for v in evaluate(report_of([failed(0)]), Thresholds())}
    assert not nothing["max_avg_generation_s"].passed
    assert nothing["max_avg_generation_s"].message == "average generation time: not measured"


def test_thresholds_file_overrides_only_what_it_names(tmp_path: Path) -> None:
    """A TOML file sets some thresholds; the others keep the plan's defaults."""
    path = tmp_path / "gate.toml"
    path.write_text("max_avg_generation_s = 0.5\nmin_success_rate = 0.95\n")

    thresholds = load_thresholds(path)

    assert thresholds.max_avg_generation_s == 0.5
    assert thresholds.min_success_rate == 0.95
    assert thresholds.max_generation_s == 15.0
    assert load_thresholds(None) == Thresholds()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        pytest.param("max_avg_generation = 3\n", "max_avg_generation", id="typo-key"),
        pytest.param("min_success_rate = 80\n", "min_success_rate", id="rate-not-fraction"),
        pytest.param('max_generation_s = "fast"\n', "max_generation_s", id="not-a-number"),
        pytest.param("max_generation_s = \n", "not valid TOML", id="bad-toml"),
    ],
)
def test_a_bad_thresholds_file_is_refused_naming_the_problem(
    tmp_path: Path, text: str, named: str
) -> None:
    """A misspelt key or a wrong value is an error, never a silently disabled gate."""
    path = tmp_path / "gate.toml"
    path.write_text(text)

    with pytest.raises(BenchmarkError, match=named):
        load_thresholds(path)


def test_a_missing_thresholds_file_is_refused(tmp_path: Path) -> None:
    """A path that does not exist says so."""
    with pytest.raises(BenchmarkError, match="cannot read thresholds"):
        load_thresholds(tmp_path / "absent.toml")


# -- comparison -----------------------------------------------------------------


def test_compare_flags_figures_worse_than_the_tolerance() -> None:
    """Generation 50 % slower regresses; a rate 5 points lower is within 10 points."""
    baseline = report_of([*overlapping(19, 2.0), failed(19)])
    current = report_of([*overlapping(18, 3.0), failed(18), failed(19)])

    changes = {c.figure: c for c in compare(current, baseline, tolerance=0.1)}

    assert changes["generation_s.avg"].regression
    assert changes["generation_s.avg"].worse_by == pytest.approx(0.5)
    assert not changes["success_rate"].regression
    assert changes["success_rate"].worse_by == pytest.approx(0.05)
    assert changes["throughput_jobs_per_s"].worse_by == pytest.approx(1 / 19)


def test_compare_counts_improvements_as_negative_and_no_regression() -> None:
    """A run faster than its baseline regresses nowhere."""
    baseline = report_of(overlapping(3, 4.0))
    current = report_of(overlapping(3, 2.0))

    changes = compare(current, baseline, tolerance=0.1)

    assert not [c for c in changes if c.regression]
    assert {c.figure: c for c in changes}["generation_s.avg"].worse_by == pytest.approx(-0.5)


def test_baseline_reads_a_saved_report_and_refuses_anything_else(tmp_path: Path) -> None:
    """A report saved as JSON reads back with the same figures; other JSON is refused."""
    report = report_of(overlapping(3, 2.0))
    saved = tmp_path / "baseline.json"
    saved.write_text(json.dumps(report))

    assert key_figures(load_baseline(saved)) == key_figures(report)

    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(BenchmarkError, match="not a report"):
        load_baseline(other)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**report, "format": 99}))
    with pytest.raises(BenchmarkError, match="format 99"):
        load_baseline(newer)


# -- inputs and the stream ------------------------------------------------------


def test_job_input_is_a_json_object_or_the_pipeline_default() -> None:
    """Story jobs get a prompt by default; --input must be a JSON object."""
    assert parse_input(None, "story") == DEFAULT_STORY_INPUT
    assert parse_input(None, "echo") == {}
    assert parse_input('{"text": "hi"}', "echo") == {"text": "hi"}
    with pytest.raises(BenchmarkError, match="not valid JSON"):
        parse_input("{text", "echo")
    with pytest.raises(BenchmarkError, match="JSON object"):
        parse_input("[1]", "echo")


def test_sse_decoder_yields_whole_events_and_skips_comments() -> None:
    """Events end at a blank line; heartbeats are ignored; a control event has seq 0."""
    lines = [
        ": ping",
        "id: 3",
        "event: token",
        'data: {"text": "Once"}',
        "",
        "",
        "event: reconnect",
        "retry: 1000",
        'data: {"after": 3}',
        "",
    ]
    decoder = SseDecoder()

    events = [event for line in lines if (event := decoder.feed(line)) is not None]

    assert [(e.seq, e.type, e.data) for e in events] == [
        (3, "token", {"text": "Once"}),
        (0, "reconnect", {"after": 3}),
    ]


def test_job_watch_counts_the_last_attempts_words_and_every_error() -> None:
    """A retried job's tokens start over; TTFT is the first token ever; errors are counted."""
    watch = JobWatch(index=0, origin=watch_origin())
    sent = watch.sent
    stream = [
        StreamEvent(1, "status", {"status": "running"}),
        StreamEvent(2, "attempt", {"attempt": 1}),
        StreamEvent(3, "token", {"text": "Once upon a ti"}),
        StreamEvent(4, "error", {"code": "backend_unavailable", "retryable": True}),
        StreamEvent(5, "attempt", {"attempt": 2}),
        StreamEvent(6, "token", {"text": "Once up"}),
        StreamEvent(7, "token", {"text": "on a time."}),
        StreamEvent(8, "final", {"status": "succeeded"}),
    ]
    finals = [watch.see(event, at=sent + event.seq) for event in stream]
    watch.record_job(
        {
            "created_at": "2026-01-01T00:00:00Z",
            "started_at": "2026-01-01T00:00:01.5Z",
            "finished_at": "2026-01-01T00:00:09Z",
        }
    )

    sample = watch.sample(Outcome.SUCCEEDED)

    assert finals[-1] == {"status": "succeeded"}
    assert finals[:-1] == [None] * 7
    assert (sample.tokens, sample.attempts, sample.errors_seen) == (4, 2, 1)
    assert sample.ttft_s == pytest.approx(3.0)
    assert sample.generation_s == pytest.approx(8.0)
    assert sample.queue_wait_s == pytest.approx(1.5)
    assert sample.started_at is not None
    assert sample.finished_at == pytest.approx(sample.started_at + 7.5)


def watch_origin() -> float:
    """The start of a run, a moment ago on the benchmark's clock."""
    return time.perf_counter()
