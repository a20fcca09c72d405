"""Pass/fail thresholds for a benchmark report, and regressions against a baseline.

The defaults are the story generator's deploy gate: average generation time
at most 10 s, none over 15 s, at least 80 % of jobs succeeding, at least 3
jobs running at once; plus time to first token (p95 at most 5 s) and the
error rate (at most 50 % of jobs meeting an error, retried or not).

A TOML file overrides any of them; keys are the field names of
:class:`Thresholds`, at the top level::

    max_avg_generation_s = 8.0
    min_success_rate = 0.95   # a fraction: 0.95 is 95 %
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forgeline.benchmark import BenchmarkError
from forgeline.benchmark.stats import REPORT_FORMAT, key_figures


class Thresholds(BaseModel):
    """The limits a run must meet. Rates are fractions (0.8 is 80 %)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_avg_generation_s: float = Field(default=10.0, gt=0)
    max_generation_s: float = Field(default=15.0, gt=0)
    min_success_rate: float = Field(default=0.80, ge=0, le=1)
    min_concurrency: int = Field(default=3, ge=1)
    max_ttft_p95_s: float = Field(default=5.0, gt=0)
    max_error_rate: float = Field(default=0.50, ge=0, le=1)
    #: How much worse than the baseline a figure may be before it is a regression
    #: (relative for timings, absolute for rates: 0.1 is 10 % or 10 points).
    regression_tolerance: float = Field(default=0.10, ge=0)


@dataclass(frozen=True)
class Figure:
    """A figure of the report as people read it."""

    label: str
    unit: Literal["s", "%", "jobs", "/s"]
    higher_is_better: bool = False

    def show(self, value: float | None) -> str:
        """The value with its unit (``12.30 s``, ``80 %``)."""
        if value is None:
            return "n/a"
        if self.unit == "%":
            return f"{value * 100:.0f} %"
        if self.unit == "jobs":
            return f"{value:.0f}"
        if self.unit == "/s":
            return f"{value:.2f}/s"
        return f"{value:.2f} s"

    def show_difference(self, amount: float) -> str:
        """A difference in this figure's unit (``2.30 s``, ``15 points``)."""
        if self.unit == "%":
            return f"{amount * 100:.0f} points"
        if self.unit == "jobs":
            return f"{amount:.0f}"
        if self.unit == "/s":
            return f"{amount:.2f}/s"
        return f"{amount:.2f} s"


FIGURES: dict[str, Figure] = {
    "success_rate": Figure("success rate", "%", higher_is_better=True),
    "error_rate": Figure("error rate", "%"),
    "peak_running": Figure("jobs running at once (peak)", "jobs", higher_is_better=True),
    "generation_s.avg": Figure("average generation time", "s"),
    "generation_s.p95": Figure("generation time p95", "s"),
    "generation_s.max": Figure("max generation time", "s"),
    "ttft_s.median": Figure("time to first token, median", "s"),
    "ttft_s.p95": Figure("time to first token p95", "s"),
    "queue_wait_s.p95": Figure("queue wait p95", "s"),
    "submit_s.p95": Figure("submit latency p95", "s"),
    "tokens_per_s.median": Figure("tokens/s per job, median", "/s", higher_is_better=True),
    "throughput_jobs_per_s": Figure("throughput (jobs/s)", "/s", higher_is_better=True),
}
#: Each threshold, the figure it limits, and whether the limit is a ceiling or a floor.
CHECKS: list[tuple[str, str, Literal["max", "min"]]] = [
    ("max_avg_generation_s", "generation_s.avg", "max"),
    ("max_generation_s", "generation_s.max", "max"),
    ("min_success_rate", "success_rate", "min"),
    ("min_concurrency", "peak_running", "min"),
    ("max_ttft_p95_s", "ttft_s.p95", "max"),
    ("max_error_rate", "error_rate", "max"),
]


@dataclass(frozen=True)
class Verdict:
    """One threshold checked against a run."""

    threshold: str
    figure: str
    limit: float
    actual: float | None
    passed: bool
    message: str

    def as_json(self) -> dict[str, Any]:
        """The verdict as it appears in the report's ``thresholds`` list."""
        return {
            "threshold": self.threshold,
            "figure": self.figure,
            "limit": self.limit,
            "actual": self.actual,
            "passed": self.passed,
            "message": self.message,
        }


@dataclass(frozen=True)
class Change:
    """One figure of this run beside the baseline's."""

    figure: str
    baseline: float
    current: float
    #: How much worse this run is: relative for timings, absolute for rates (negative: better).
    worse_by: float
    regression: bool

    def as_json(self) -> dict[str, Any]:
        """The change as it appears in the report's ``comparison`` list."""
        return {
            "figure": self.figure,
            "baseline": self.baseline,
            "current": self.current,
            "worse_by": self.worse_by,
            "regression": self.regression,
        }


def load_thresholds(path: Path | None) -> Thresholds:
    """The defaults, overridden by the TOML file at ``path`` when one is given."""
    if path is None:
        return Thresholds()
    try:
        with path.open("rb") as file:
            values = tomllib.load(file)
    except OSError as exc:
        raise BenchmarkError(f"cannot read thresholds {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BenchmarkError(f"thresholds {path} is not valid TOML: {exc}") from None
    try:
        return Thresholds.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise BenchmarkError(f"thresholds {path}: {problems}") from None


def load_baseline(path: Path) -> dict[str, Any]:
    """A report saved by an earlier ``forgeline bench --json``."""
    try:
        report: Any = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(report, dict):
            raise TypeError
        key_figures(report)
    except OSError as exc:
        raise BenchmarkError(f"cannot read baseline {path}: {exc.strerror}") from None
    except (ValueError, TypeError, KeyError, AttributeError):
        raise BenchmarkError(
            f"baseline {path} is not a report written by `forgeline bench --json`"
        ) from None
    if report.get("format") != REPORT_FORMAT:
        raise BenchmarkError(
            f"baseline {path} has report format {report.get('format')!r}; "
            f"this forgeline writes format {REPORT_FORMAT}"
        )
    return report


def evaluate(report: dict[str, Any], thresholds: Thresholds) -> list[Verdict]:
    """Every threshold checked against ``report``, in a fixed order."""
    figures = key_figures(report)
    verdicts: list[Verdict] = []
    for name, key, kind in CHECKS:
        limit = float(getattr(thresholds, name))
        actual = figures[key]
        figure = FIGURES[key]
        if actual is None:
            verdicts.append(Verdict(name, key, limit, None, False, f"{figure.label}: not measured"))
            continue
        passed = actual <= limit if kind == "max" else actual >= limit
        if passed:
            bound = "the limit" if kind == "max" else "the minimum"
            message = f"{figure.label} {figure.show(actual)} meets {bound} {figure.show(limit)}"
        elif kind == "max":
            message = (
                f"{figure.label} {figure.show(actual)} is "
                f"{figure.show_difference(actual - limit)} over the limit {figure.show(limit)}"
            )
        else:
            message = (
                f"{figure.label} {figure.show(actual)} is "
                f"{figure.show_difference(limit - actual)} under the minimum {figure.show(limit)}"
            )
        verdicts.append(Verdict(name, key, limit, actual, passed, message))
    return verdicts


def compare(report: dict[str, Any], baseline: dict[str, Any], *, tolerance: float) -> list[Change]:
    """Figures of ``report`` beside ``baseline``'s; those worse beyond ``tolerance`` regress."""
    now, before = key_figures(report), key_figures(baseline)
    changes: list[Change] = []
    for key, figure in FIGURES.items():
        current, previous = now.get(key), before.get(key)
        if current is None or previous is None:
            continue
        if figure.unit == "%":
            worse_by = previous - current if figure.higher_is_better else current - previous
        elif previous > 0:
            ratio = current / previous
            worse_by = 1 - ratio if figure.higher_is_better else ratio - 1
        else:
            continue  # nothing to scale a change by
        changes.append(Change(key, previous, current, worse_by, worse_by > tolerance))
    return changes
