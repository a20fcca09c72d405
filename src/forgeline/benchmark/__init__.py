"""``forgeline bench``: a generation benchmark that doubles as a deploy gate.

It submits jobs to a forgeline API (or to one it starts in-process), follows
each job's event stream, and measures what a client sees: submit latency,
queue wait, time to first token, tokens per second and total generation
time. The figures are checked against thresholds and, optionally, compared
with an earlier run.

- :mod:`~forgeline.benchmark.runner` drives the jobs over HTTP.
- :mod:`~forgeline.benchmark.stream` reads a job's stream and records what it saw.
- :mod:`~forgeline.benchmark.stats` turns what each job saw into a report.
- :mod:`~forgeline.benchmark.thresholds` holds the verdicts and comparisons.
- :mod:`~forgeline.benchmark.render` prints the report as rich tables.
- :mod:`~forgeline.benchmark.local` serves forgeline in-process for a run.
- :mod:`~forgeline.benchmark.command` ties them together for the CLI.
"""

from forgeline.errors import ForgelineError


class BenchmarkError(ForgelineError):
    """The benchmark could not run, or its inputs (thresholds, baseline) are unusable."""

    code = "benchmark_error"
