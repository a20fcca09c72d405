"""``forgeline bench`` from options to exit status: run, report, judge, save.

Exit status: 0 when every threshold passes, 1 when one fails (or, with
``fail_on_regression``, when a figure regressed against the baseline). A
benchmark that cannot run at all raises :class:`BenchmarkError` (or another
forgeline error), which the CLI prints as one line.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from forgeline.benchmark import BenchmarkError
from forgeline.benchmark.local import serve_in_process
from forgeline.benchmark.render import render_report
from forgeline.benchmark.runner import Benchmark, BenchPlan, BenchRun, default_input
from forgeline.benchmark.stats import JobSample, Outcome, build_report
from forgeline.benchmark.thresholds import compare, evaluate, load_baseline, load_thresholds
from forgeline.settings import Settings


@dataclass(frozen=True)
class BenchOptions:
    """The command's options, as typed by the operator."""

    url: str | None
    api_key: str | None
    pipeline: str
    jobs: int
    concurrency: int
    ramp_s: float = 0.0
    input_json: str | None = None
    job_timeout_s: float = 120.0
    json_path: Path | None = None
    thresholds_path: Path | None = None
    compare_path: Path | None = None
    fail_on_regression: bool = False


def parse_input(text: str | None, pipeline: str) -> dict[str, Any]:
    """The input every job gets: ``--input`` (a JSON object), or the pipeline's default."""
    if text is None:
        return default_input(pipeline)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BenchmarkError(f"--input is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BenchmarkError("--input must be a JSON object")
    return value


def run_bench(
    options: BenchOptions, *, settings: Settings | None, out: Console, err: Console
) -> int:
    """Run the benchmark, print and save its report; return the exit status.

    ``settings`` are used only without ``url``, to serve forgeline in-process.
    Thresholds and the baseline are read first, so a typo in either costs
    nothing.
    """
    thresholds = load_thresholds(options.thresholds_path)
    baseline = load_baseline(options.compare_path) if options.compare_path else None
    job_input = parse_input(options.input_json, options.pipeline)
    run, target = asyncio.run(_run(options, job_input, settings, err))
    report = build_report(
        run.samples,
        target=target,
        pipeline=options.pipeline,
        job_input=job_input,
        concurrency=options.concurrency,
        ramp_s=options.ramp_s,
        started_at=run.started_at,
        wall_s=run.wall_s,
    )
    verdicts = evaluate(report, thresholds)
    changes = None
    if baseline is not None:
        changes = compare(report, baseline, tolerance=thresholds.regression_tolerance)
        report["comparison"] = {
            "baseline": str(options.compare_path),
            "tolerance": thresholds.regression_tolerance,
            "changes": [change.as_json() for change in changes],
        }
    failed = [verdict for verdict in verdicts if not verdict.passed]
    regressions = [change for change in changes or [] if change.regression]
    gate_failed = bool(failed) or (options.fail_on_regression and bool(regressions))
    report["thresholds"] = [verdict.as_json() for verdict in verdicts]
    report["verdict"] = "fail" if gate_failed else "pass"

    baseline_name = options.compare_path.name if options.compare_path else None
    render_report(out, report, verdicts, changes, baseline_name)
    if options.json_path is not None:
        _write_json(options.json_path, report)
    for verdict in failed:
        out.print(f"[red]FAIL[/red] {verdict.threshold}: {verdict.message}", highlight=False)
    for change in regressions:
        out.print(
            f"[red]REGRESSION[/red] {change.figure}: {change.current:.4g} against "
            f"{change.baseline:.4g} in {baseline_name}",
            highlight=False,
        )
    if gate_failed:
        reasons = [f"{len(failed)} threshold(s) failed"] if failed else []
        if options.fail_on_regression and regressions:
            reasons.append(f"{len(regressions)} regression(s)")
        out.print(f"[red]verdict: FAIL[/red] ({', '.join(reasons)})")
        return 1
    out.print("[green]verdict: pass[/green]")
    return 0


async def _run(
    options: BenchOptions,
    job_input: dict[str, Any],
    settings: Settings | None,
    err: Console,
) -> tuple[BenchRun, dict[str, Any]]:
    def plan(url: str, api_key: str | None) -> BenchPlan:
        return BenchPlan(
            base_url=url,
            pipeline=options.pipeline,
            job_input=job_input,
            jobs=options.jobs,
            concurrency=options.concurrency,
            ramp_s=options.ramp_s,
            api_key=api_key,
            job_timeout_s=options.job_timeout_s,
        )

    if options.url is not None:
        target = {"url": options.url, "in_process": False, "description": options.url}
        return await _run_against(plan(options.url, options.api_key), options, err), target
    if settings is None:
        raise BenchmarkError("an in-process run needs settings")
    description = _describe_in_process(settings)
    err.print(f"starting forgeline in-process: {description}", highlight=False)
    async with serve_in_process(settings) as local:
        run = await _run_against(plan(local.url, local.api_key), options, err)
    return run, {"url": local.url, "in_process": True, "description": f"in-process: {description}"}


async def _run_against(plan: BenchPlan, options: BenchOptions, err: Console) -> BenchRun:
    # The bar appears once the server has been checked: an error stands alone.
    async with Benchmark(plan) as benchmark:
        with _ProgressBar(err, options) as bar:
            return await benchmark.run(on_job_done=bar.job_done)


def _describe_in_process(settings: Settings) -> str:
    database = "embedded database" if settings.embedded_database else "FORGELINE_DATABASE_URL"
    return (
        f"{database}, backend {settings.backend}, "
        f"{settings.worker_concurrency} jobs at a time per worker"
    )


def _write_json(path: Path, report: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise BenchmarkError(f"cannot write the report to {path}: {exc.strerror}") from None


class _ProgressBar:
    """A progress bar on stderr: jobs done out of all, and how many failed."""

    def __init__(self, console: Console, options: BenchOptions) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[green]{task.fields[ok]} ok[/green] [red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=console,
            # Gone once the run ends: the report follows, or an error stands alone.
            transient=True,
            # A bar is for people watching; a CI log gets the report alone.
            disable=not console.is_terminal,
        )
        label = f"{options.pipeline} x{options.jobs} at concurrency {options.concurrency}"
        self._task: TaskID = self._progress.add_task(label, total=options.jobs, ok=0, failed=0)
        self._ok = self._failed = 0

    def __enter__(self) -> _ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def job_done(self, sample: JobSample) -> None:
        """Count one finished job."""
        if sample.outcome is Outcome.SUCCEEDED:
            self._ok += 1
        else:
            self._failed += 1
        self._progress.update(self._task, advance=1, ok=self._ok, failed=self._failed)
