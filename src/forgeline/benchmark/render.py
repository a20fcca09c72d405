"""The benchmark report as rich tables, for a terminal or a CI log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from forgeline.benchmark.stats import STATISTICS, TIMINGS
from forgeline.benchmark.thresholds import FIGURES, Change, Verdict


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_report(
    console: Console,
    report: dict[str, Any],
    verdicts: Sequence[Verdict],
    changes: Sequence[Change] | None = None,
    baseline_name: str | None = None,
) -> None:
    """Print the summary, timings, stress figures, verdicts and any comparison."""
    console.print(_summary_table(report))
    console.print(_timings_table(report))
    console.print(_stress_table(report))
    console.print(_verdicts_table(verdicts))
    if changes is not None:
        console.print(_changes_table(changes, baseline_name or "baseline"))


def _summary_table(report: dict[str, Any]) -> Table:
    summary = report["summary"]
    ramp = f", ramp {report['ramp_s']:g} s" if report["ramp_s"] else ""
    table = Table("", "", title="forgeline bench", show_header=False)
    table.add_row("target", str(report["target"]["description"]))
    table.add_row("pipeline", report["pipeline"])
    table.add_row("jobs", f"{summary['count']} at concurrency {report['concurrency']}{ramp}")
    table.add_row("successes", str(summary["succeeded"]))
    table.add_row("failures", str(summary["failed"]))
    table.add_row("success rate", _percent(summary["success_rate"]))
    table.add_row("error rate", _percent(summary["error_rate"]))
    table.add_row("wall time", f"{report['wall_s']:.2f} s")
    return table


def _timings_table(report: dict[str, Any]) -> Table:
    table = Table(
        "timing",
        "n",
        *STATISTICS,
        title="timings",
        caption="submit latency: every answered submit; the others: jobs that succeeded",
    )
    for name, label in TIMINGS.items():
        summary = report["timings"][name]
        digits = 1 if name == "tokens_per_s" else 3
        table.add_row(
            label,
            str(summary["count"]),
            *(_number(summary[statistic], digits) for statistic in STATISTICS),
        )
    return table


def _stress_table(report: dict[str, Any]) -> Table:
    stress, summary = report["stress"], report["summary"]
    table = Table("", "", title=f"stress at concurrency {stress['concurrency']}", show_header=False)
    table.add_row("jobs in flight at once (client, peak)", str(stress["peak_in_flight"]))
    peak_running = stress["peak_running"]
    table.add_row(
        "jobs running at once (server, peak)", "n/a" if peak_running is None else str(peak_running)
    )
    table.add_row("throughput", f"{_number(stress['throughput_jobs_per_s'], 2)} jobs/s")
    table.add_row("tokens/s, all jobs", _number(stress["tokens_per_s"], 1))
    outcomes = ", ".join(f"{name} {count}" for name, count in summary["outcomes"].items())
    table.add_row("outcomes", outcomes or "none")
    codes = ", ".join(f"{code} {count}" for code, count in summary["error_codes"].items())
    table.add_row("error codes", codes or "none")
    return table


def _verdicts_table(verdicts: Sequence[Verdict]) -> Table:
    table = Table("threshold", "limit", "actual", "result", "detail", title="thresholds")
    for verdict in verdicts:
        figure = FIGURES[verdict.figure]
        result = "[green]pass[/green]" if verdict.passed else "[red]FAIL[/red]"
        table.add_row(
            verdict.threshold,
            figure.show(verdict.limit),
            figure.show(verdict.actual),
            result,
            "" if verdict.passed else verdict.message,
        )
    return table


def _changes_table(changes: Sequence[Change], baseline_name: str) -> Table:
    table = Table(
        "figure", "baseline", "now", "change", "result", title=f"compared with {baseline_name}"
    )
    for change in changes:
        figure = FIGURES[change.figure]
        if figure.unit == "%":
            shift = f"{(change.current - change.baseline) * 100:+.1f} points"
        else:
            shift = f"{(change.current / change.baseline - 1) * 100:+.1f} %"
        if change.regression:
            result = "[red]regression[/red]"
        elif change.worse_by > 0:
            result = "worse, within tolerance"
        elif change.worse_by < 0:
            result = "[green]better[/green]"
        else:
            result = "same"
        table.add_row(
            figure.label, figure.show(change.baseline), figure.show(change.current), shift, result
        )
    return table
