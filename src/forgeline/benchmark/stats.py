"""What a benchmark measured: one record per job, and the report built from them.

The report is plain JSON-ready data, so a saved report (``--json``) and a
fresh one are read the same way by :func:`key_figures`, which is what the
thresholds and the comparison with a baseline look at.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: Version of the report's JSON shape; bumped when a field changes meaning.
REPORT_FORMAT = 1
#: Timings summarised in the report, with the label shown for each.
TIMINGS: dict[str, str] = {
    "submit_s": "submit latency (s)",
    "queue_wait_s": "queue wait (s)",
    "ttft_s": "time to first token (s)",
    "generation_s": "generation time (s)",
    "tokens_per_s": "tokens/s per job",
}
#: The statistics of each timing, in the order the report shows them.
STATISTICS = ("min", "median", "avg", "p95", "max")


class Outcome(enum.StrEnum):
    """How one benchmark job ended, as the client saw it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the job ran and failed
    CANCELLED = "cancelled"
    REJECTED = "rejected"  # the submit was refused (rate limit, server error, no answer)
    LOST = "lost"  # the stream could not be followed to the final event
    TIMEOUT = "timeout"  # no final event within the job timeout


@dataclass(frozen=True)
class JobSample:
    """What the benchmark saw of one job.

    Offsets (``sent_at_s``, ``ended_at_s``) count from the start of the run,
    on the client's clock. ``started_at`` and ``finished_at`` are the job's
    own timestamps (seconds since the epoch, the server's clock), used for
    the queue wait and to count jobs running at once.
    """

    index: int
    outcome: Outcome
    job_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    sent_at_s: float = 0.0
    ended_at_s: float = 0.0
    submit_s: float | None = None
    queue_wait_s: float | None = None
    ttft_s: float | None = None
    generation_s: float | None = None
    tokens: int = 0
    attempts: int = 0
    #: ``error`` events on the stream: attempts that failed, retried or not.
    errors_seen: int = 0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """Tokens after the first, per second, from the first token to the final event."""
        if self.ttft_s is None or self.generation_s is None or self.tokens == 0:
            return None
        streaming_s = self.generation_s - self.ttft_s
        return self.tokens / streaming_s if streaming_s > 0 else None

    @property
    def met_an_error(self) -> bool:
        """True when the job did not succeed, or an attempt of it failed on the way."""
        return self.outcome is not Outcome.SUCCEEDED or self.errors_seen > 0

    def as_json(self) -> dict[str, Any]:
        """The sample as it appears in the report's ``samples`` list."""
        data = asdict(self)
        data["outcome"] = self.outcome.value
        data["tokens_per_s"] = self.tokens_per_s
        return data


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` by nearest rank (0.5 is the median).

    Nearest rank, as ``bench/``'s figures use: every value reported is one
    that was measured.
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered) - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def summarise(values: Sequence[float]) -> dict[str, float | int | None]:
    """Count, min, median, average, p95 and max of ``values`` (``None`` when empty)."""
    if not values:
        return {"count": 0, **dict.fromkeys(STATISTICS)}
    return {
        "count": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "avg": statistics.fmean(values),
        "p95": percentile(values, 0.95),
        "max": max(values),
    }


def peak_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals open at one instant (one ending as another starts: not both)."""
    moments: list[tuple[float, int]] = []
    for start, end in intervals:
        # Ends sort before starts at the same instant (-1 < 1).
        moments += [(start, 1), (end, -1)]
    peak = current = 0
    for _, change in sorted(moments):
        current += change
        peak = max(peak, current)
    return peak


def _timing_values(samples: Sequence[JobSample], name: str) -> list[float]:
    # Submit latency counts every answered submit; the rest, the jobs that
    # succeeded, so that fast failures do not flatter the generation figures.
    chosen = samples
    if name != "submit_s":
        chosen = [sample for sample in samples if sample.outcome is Outcome.SUCCEEDED]
    values = [getattr(sample, name) for sample in chosen]
    return [value for value in values if value is not None]


def build_report(
    samples: Sequence[JobSample],
    *,
    target: dict[str, Any],
    pipeline: str,
    job_input: dict[str, Any],
    concurrency: int,
    ramp_s: float,
    started_at: str,
    wall_s: float,
) -> dict[str, Any]:
    """The report of one run, as JSON-ready data."""
    count = len(samples)
    succeeded = [s for s in samples if s.outcome is Outcome.SUCCEEDED]
    outcomes = Counter(sample.outcome.value for sample in samples)
    error_codes = Counter(s.error_code for s in samples if s.error_code is not None)
    running = [
        (s.started_at, s.finished_at)
        for s in samples
        if s.started_at is not None and s.finished_at is not None
    ]
    in_flight = [(s.sent_at_s, s.ended_at_s) for s in samples]
    tokens = sum(s.tokens for s in succeeded)
    return {
        "format": REPORT_FORMAT,
        "target": target,
        "pipeline": pipeline,
        "input": job_input,
        "jobs": count,
        "concurrency": concurrency,
        "ramp_s": ramp_s,
        "started_at": started_at,
        "wall_s": wall_s,
        "summary": {
            "count": count,
            "succeeded": len(succeeded),
            "failed": count - len(succeeded),
            "success_rate": len(succeeded) / count if count else None,
            "error_rate": sum(s.met_an_error for s in samples) / count if count else None,
            "outcomes": dict(sorted(outcomes.items())),
            "error_codes": dict(error_codes.most_common()),
        },
        "timings": {name: summarise(_timing_values(samples, name)) for name in TIMINGS},
        "stress": {
            "concurrency": concurrency,
            "peak_in_flight": peak_overlap(in_flight),
            "peak_running": peak_overlap(running) if running else None,
            "throughput_jobs_per_s": len(succeeded) / wall_s if wall_s > 0 else None,
            "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
            "tokens": tokens,
        },
        "samples": [sample.as_json() for sample in samples],
    }


def key_figures(report: dict[str, Any]) -> dict[str, float | None]:
    """The figures thresholds and comparisons look at, by name (``generation_s.avg``).

    Works on a report just built and on one read back from JSON.
    """
    figures: dict[str, float | None] = {
        "success_rate": report["summary"]["success_rate"],
        "error_rate": report["summary"]["error_rate"],
        "peak_running": report["stress"]["peak_running"],
        "throughput_jobs_per_s": report["stress"]["throughput_jobs_per_s"],
    }
    for timing, summary in report["timings"].items():
        for statistic in STATISTICS:
            figures[f"{timing}.{statistic}"] = summary.get(statistic)
    return figures
