"""End-to-end throughput of no-op jobs through one ``forgeline worker``.

Submit N ``echo`` jobs once, through :meth:`JobService.submit` (the same call
the API makes); then, for each worker concurrency asked for, on a fresh copy
of that database, start one ``forgeline worker --concurrency C`` subprocess
and wait until every job is final. Throughput is N divided by the span from
the first ``jobs.started_at`` to the last ``jobs.finished_at``, both written
by the database, so worker start-up is left out (it is reported apart).

Besides jobs/s it reports the CPU the worker and the local PostgreSQL spent
per job, and how many database transactions each job cost: the figures that
say where the time goes on a small machine.

    python -m bench.job_throughput                    # 1500 jobs at concurrency 1, 8, 32
    python -m bench.job_throughput --jobs 5000 --concurrency 16 --json out.json
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.support import (
    Forgeline,
    add_admin_url,
    base_parser,
    cpu_seconds,
    forgeline_env,
    load_average,
    machine_info,
    postgres_cpu_seconds,
    print_machine,
    scratch_databases,
    summary_ms,
    workdir,
    write_json,
)

#: Jobs submitted at once during the submit phase (in this process).
SUBMITTERS = 16
#: How often the benchmark asks the database how many jobs are final.
POLL_INTERVAL_S = 0.1

PROGRESS = (
    "SELECT count(*) FILTER (WHERE started_at IS NOT NULL), "
    "count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled')) FROM jobs"
)
COMMITS = (
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
)
OUTCOME = """
SELECT count(*),
       count(*) FILTER (WHERE status = 'succeeded'),
       max(attempts),
       min(started_at),
       max(finished_at),
       extract(epoch FROM max(finished_at) - min(started_at)),
       array_agg(extract(epoch FROM finished_at - started_at)),
       array_agg(extract(epoch FROM started_at - created_at))
FROM jobs
"""


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run every concurrency asked for, print and save."""
    parser = base_parser(__doc__.split("\n\n")[0])
    add_admin_url(parser)
    parser.add_argument(
        "--jobs", type=int, default=1500, help="jobs submitted (each run drains them all)"
    )
    parser.add_argument(
        "--concurrency",
        default="1,8,32",
        help="worker --concurrency values to try, comma-separated",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="FORGELINE_LOG_LEVEL of the worker (info is the default a deployment runs)",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=120.0, help="longest wait for one run's jobs"
    )
    parser.add_argument("--keep", action="store_true", help="keep the worker's log files")
    args = parser.parse_args(argv)
    concurrencies = [int(part) for part in args.concurrency.split(",") if part.strip()]

    info = machine_info(args.admin_url)
    print("forgeline job throughput: echo jobs, one worker process")
    print_machine(info)
    print(
        f"load avg    {info['load_average_1m']} (1 minute, at start; other work shares the cores)"
    )
    print(f"jobs/run    {args.jobs}, worker log level {args.log_level}\n")

    runs: list[dict[str, Any]] = []
    with scratch_databases(args.admin_url) as databases, workdir("fl-bench-", args.keep) as root:
        # Submitted once; every run drains its own copy of the same queue.
        queued_url = databases.create()
        submit_s = asyncio.run(submit_jobs(queued_url, root, args.jobs))
        print(
            f"submitted   {args.jobs} jobs in {submit_s:.2f} s through JobService.submit "
            f"({args.jobs / submit_s:.0f} jobs/s, {SUBMITTERS} at a time, in-process)\n"
        )
        for concurrency in concurrencies:
            run = measure(
                databases.clone(queued_url),
                root / f"c{concurrency}",
                jobs=args.jobs,
                concurrency=concurrency,
                log_level=args.log_level,
                timeout_s=args.timeout_s,
            )
            runs.append(run)
            print_run(run)

    best = max(runs, key=lambda r: r["jobs_per_s"]) if runs else None
    if best is not None:
        print(f"\nbest: {best['jobs_per_s']:.0f} jobs/s at --concurrency {best['concurrency']}")
    write_json(
        args.json,
        {
            "benchmark": "job_throughput",
            "machine": info,
            "jobs": args.jobs,
            "submit_s": round(submit_s, 3),
            "submit_per_s": round(args.jobs / submit_s, 1),
            "log_level": args.log_level,
            "runs": runs,
        },
    )


def measure(
    url: str,
    folder: Path,
    *,
    jobs: int,
    concurrency: int,
    log_level: str,
    timeout_s: float,
) -> dict[str, Any]:
    """One run: drain the ``jobs`` queued in the database at ``url`` with one worker."""
    folder.mkdir(parents=True)

    worker = Forgeline(
        ["worker", "--concurrency", str(concurrency)],
        forgeline_env(
            database_url=url,
            auto_migrate="false",
            data_dir=folder / "data",
            storage_url=(folder / "artifacts").as_uri(),
            log_level=log_level,
        ),
        folder,
    )
    polls = 0
    commits_before = _read(url, COMMITS)
    pg_cpu_before = postgres_cpu_seconds()
    load_before = load_average()
    with psycopg.connect(url, autocommit=True) as db:
        worker.start()
        deadline = worker.started_at + timeout_s
        done = 0
        # Worker CPU when the first job is seen started: what start-up cost.
        startup_cpu: float | None = None
        while done < jobs and time.monotonic() < deadline:
            if worker.process is not None and worker.process.poll() is not None:
                raise RuntimeError(f"the worker exited early:\n{worker.output()[-3000:]}")
            time.sleep(POLL_INTERVAL_S)
            row = db.execute(PROGRESS).fetchone()
            started, done = (int(row[0]), int(row[1])) if row else (0, 0)
            if startup_cpu is None and started:
                startup_cpu = cpu_seconds(worker.pid)
            polls += 1
        drained_s = time.monotonic() - worker.started_at
        worker_cpu_total = cpu_seconds(worker.pid)
        pg_cpu_after = postgres_cpu_seconds()
        worker.stop()
    time.sleep(1.0)
    commits_after = _read(url, COMMITS)
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(OUTCOME).fetchone()
    if row is None:
        raise RuntimeError("no outcome row")
    total, succeeded, max_attempts, _, _, span_s, run_s, wait_s = row
    span = float(span_s or 0.0)
    # Each poll, and the first statistics read, is one transaction of ours.
    commits = commits_after - commits_before - polls - 1
    worker_cpu = (
        None if worker_cpu_total is None or startup_cpu is None else worker_cpu_total - startup_cpu
    )
    pg_cpu = None if pg_cpu_before is None or pg_cpu_after is None else pg_cpu_after - pg_cpu_before
    return {
        "concurrency": concurrency,
        "jobs": jobs,
        "finished": done,
        "succeeded": succeeded,
        "total_rows": total,
        "max_attempts_seen": max_attempts,
        "timed_out": done < jobs,
        "span_s": round(span, 3),
        "jobs_per_s": round(done / span, 1) if span > 0 else 0.0,
        "launch_to_drained_s": round(drained_s, 3),
        "startup_s": round(drained_s - span, 3),
        "job_run_ms": summary_ms([float(v) for v in run_s if v is not None]),
        "worker_startup_cpu_s": startup_cpu,
        "worker_cpu_s": None if worker_cpu is None else round(worker_cpu, 2),
        "worker_cpu_share": None if worker_cpu is None or not span else round(worker_cpu / span, 2),
        "worker_cpu_ms_per_job": _per_job(worker_cpu, done),
        "postgres_cpu_s": None if pg_cpu is None else round(pg_cpu, 2),
        "postgres_cpu_ms_per_job": _per_job(pg_cpu, done),
        "load_average_before": load_before,
        "transactions_per_job": round(commits / done, 2) if done else None,
        "queue_wait_ms_max": summary_ms([float(v) for v in wait_s if v is not None])["max"],
    }


async def submit_jobs(url: str, folder: Path, jobs: int) -> float:
    """Submit ``jobs`` echo jobs through the job service; returns the seconds it took."""
    from forgeline.runtime import Runtime
    from forgeline.settings import get_settings

    settings = get_settings(
        _env_file=None,
        database_url=url,
        auto_migrate=False,
        data_dir=folder / "data",
        storage_url=(folder / "artifacts").as_uri(),
    )
    runtime = await Runtime.start(settings)
    gate = asyncio.Semaphore(SUBMITTERS)

    async def one(index: int) -> None:
        async with gate:
            await runtime.jobs.submit(owner=None, pipeline="echo", job_input={"text": str(index)})

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(jobs)))
        return time.perf_counter() - started
    finally:
        await runtime.close()


def print_run(run: dict[str, Any]) -> None:
    """One run as a few lines."""
    warn = "  (TIMED OUT)" if run["timed_out"] else ""
    print(
        f"--concurrency {run['concurrency']:>3}: {run['jobs_per_s']:7.1f} jobs/s "
        f"({run['finished']}/{run['jobs']} final, {run['succeeded']} succeeded "
        f"in {run['span_s']:.2f} s){warn}"
    )
    print(
        f"    worker start-up "
        f"{run['startup_s']:.2f} s; one job runs p50 {run['job_run_ms']['p50']:.1f} ms, "
        f"p99 {run['job_run_ms']['p99']:.1f} ms"
    )
    print(
        f"    CPU per job: worker {_fmt(run['worker_cpu_ms_per_job'])} ms "
        f"(busy {_fmt(run['worker_cpu_share'])} of a core), "
        f"postgres {_fmt(run['postgres_cpu_ms_per_job'])} ms; "
        f"~{_fmt(run['transactions_per_job'])} transactions per job; "
        f"load average before {_fmt(run['load_average_before'])}"
    )


def _scalar(db: psycopg.Connection[Any], query: str) -> int:
    row = db.execute(query).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _read(url: str, query: str) -> int:
    with psycopg.connect(url, autocommit=True) as db:
        return _scalar(db, query)


def _per_job(seconds: float | None, jobs: int) -> float | None:
    return None if seconds is None or not jobs else round(seconds * 1000 / jobs, 2)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


if __name__ == "__main__":
    main()
