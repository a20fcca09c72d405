"""What forgeline must survive: workers killed, drained, poisoned; clients crashing.

Automates the "Jobs and workers" items of RELIABILITY.md (1-4, 7) and
cancellation. Workers are real ``python -m forgeline worker`` subprocesses on a
fresh database; the test process is the client (an in-process runtime that
submits and cancels, and never runs jobs unless a test says so). Test-only
pipelines from ``tests.support.pipelines`` write a journal, one line per
execution start, so executions per job can be counted even across ``kill -9``.

Nothing here sleeps to wait for something: every wait polls the database, the
journal or a process with a bound (:func:`wait_until`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from procrastinate.job_context import AbortReason
from sqlalchemy import text

from forgeline.api.app import create_app
from forgeline.errors import ConflictError
from forgeline.jobs import queue
from forgeline.jobs.models import JobStatus
from forgeline.runtime import Runtime
from forgeline.settings import Settings
from tests.conftest import FAST_TIMINGS
from tests.support.auth import ADMIN_KEY, AUTH
from tests.support.pipelines import (
    ArtifactInput,
    artifact_body,
    artifact_usage,
    read_journal,
    starts_by_job,
)
from tests.support.processes import ForgelineProcess, forgeline_env, settings_env

TEST_PIPELINES = [
    "tests.support.pipelines:SleepPipeline",
    "tests.support.pipelines:SuicidePipeline",
    "tests.support.pipelines:ArtifactPipeline",
]
#: Shorter than FAST_TIMINGS for single-job recovery tests; still valid settings
#: (stall threshold 2 s > drain 1 s + two heartbeats of 0.25 s).
QUICK_TIMINGS: dict[str, Any] = {
    "drain_timeout_s": 1.0,
    "heartbeat_interval_s": 0.25,
    "stall_threshold_s": 2.0,
    "sweep_interval_s": 0.25,
    "retry_backoff_s": 0.0,
}
#: A handed-back job waits in the queue for the workers' next poll (``run_worker``
#: polls every 2 s; a retry sends no notification).
FETCH_POLL_S = 2.0
#: Settings passed on to worker subprocesses as FORGELINE_* variables.
INHERITED_SETTINGS = (
    "data_dir",
    "storage_url",
    "openai_base_url",
    "backend_connect_timeout_s",
    "backend_max_retries",
    "worker_concurrency",
    "max_attempts",
    "drain_timeout_s",
    "heartbeat_interval_s",
    "stall_threshold_s",
    "sweep_interval_s",
    "retry_backoff_s",
)
WORKER_READY_LINE = "forgeline worker running"
FINAL = tuple(
    status.value for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
)


async def wait_until(
    predicate: Callable[[], Any], timeout_s: float, *, what: str, interval_s: float = 0.05
) -> Any:
    """Poll ``predicate`` (sync or async) until it is truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true after {timeout_s:g} s: {what}")
        await asyncio.sleep(interval_s)


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment of a worker subprocess sharing ``settings`` with the test."""
    values: dict[str, object] = {name: getattr(settings, name) for name in INHERITED_SETTINGS}
    assert settings.database_url is not None
    values["database_url"] = settings.database_url.get_secret_value()
    values["pipelines"] = ",".join(settings.pipelines)
    return forgeline_env(settings_env(**values))


@dataclass
class Cluster:
    """One test's database, its client runtime, its worker subprocesses and journal."""

    settings: Settings
    runtime: Runtime
    workdir: Path
    workers: list[ForgelineProcess] = field(default_factory=list)

    @property
    def journal(self) -> Path:
        """The file every test pipeline run appends its events to."""
        return self.workdir / "journal.jsonl"

    @property
    def env(self) -> dict[str, str]:
        """Environment of the worker subprocesses."""
        return worker_environment(self.settings)

    # -- workers ------------------------------------------------------------
    def start_worker(self) -> ForgelineProcess:
        """Start ``forgeline worker`` (returns at once)."""
        log = self.workdir / f"worker-{len(self.workers)}.log"
        worker = ForgelineProcess(["worker"], self.env, log).start()
        self.workers.append(worker)
        return worker

    async def ready(self, *workers: ForgelineProcess, timeout_s: float = 30.0) -> None:
        """Wait until each worker has started its runtime (fail if one exits)."""
        for worker in workers:

            def started(worker: ForgelineProcess = worker) -> bool:
                if worker.process.poll() is not None:
                    raise AssertionError(
                        f"worker exited with {worker.process.returncode}:\n{worker.output()}"
                    )
                return WORKER_READY_LINE in worker.output()

            await wait_until(started, timeout_s, what=f"worker {worker.process.pid} started")

    async def exited(self, worker: ForgelineProcess, timeout_s: float) -> int:
        """Wait for ``worker`` to exit; its exit status."""
        await wait_until(
            lambda: worker.process.poll() is not None,
            timeout_s,
            what=f"worker {worker.process.pid} exited",
        )
        return worker.process.returncode

    def kill_all(self) -> None:
        """kill -9 every worker still running (teardown)."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.kill()

    # -- jobs ---------------------------------------------------------------
    async def submit(self, pipeline: str, **job_input: Any) -> uuid.UUID:
        """Submit a job journaling to this cluster's journal."""
        if pipeline != "echo":
            job_input.setdefault("journal", str(self.journal))
        submission = await self.runtime.jobs.submit(
            owner=None, pipeline=pipeline, job_input=job_input
        )
        return submission.job.id

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        """Rows of a query on the test database."""
        async with self.runtime.sessions() as session:
            return list((await session.execute(text(sql), params)).all())

    async def value(self, sql: str, **params: Any) -> Any:
        """The single value of a query on the test database."""
        async with self.runtime.sessions() as session:
            return await session.scalar(text(sql), params)

    async def statuses(self, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        """Status of each job."""
        found = await self.rows("SELECT id, status FROM jobs WHERE id = ANY(:ids)", ids=job_ids)
        return {row.id: row.status for row in found}

    async def all_final(self, job_ids: list[uuid.UUID]) -> bool:
        """True once every job has a final status."""
        return all(status in FINAL for status in (await self.statuses(job_ids)).values())

    async def status(self, job_id: uuid.UUID) -> str:
        """Status of one job."""
        return str(await self.value("SELECT status FROM jobs WHERE id = :id", id=job_id))

    async def queue_status(self, job_id: uuid.UUID) -> str:
        """Status of the job's Procrastinate entry."""
        return str(
            await self.value(
                "SELECT q.status FROM procrastinate_jobs q JOIN jobs j ON j.queue_job_id = q.id "
                "WHERE j.id = :id",
                id=job_id,
            )
        )

    def starts(self) -> dict[uuid.UUID, list[dict[str, Any]]]:
        """The journal's execution starts, by job."""
        return starts_by_job(read_journal(self.journal))

    def in_flight(self, pid: int) -> set[uuid.UUID]:
        """Jobs whose execution started in process ``pid`` and has not ended."""
        open_runs: set[tuple[str, int]] = set()
        for event in read_journal(self.journal):
            if event["pid"] != pid:
                continue
            run = (event["job_id"], event["attempt"])
            if event["event"] == "start":
                open_runs.add(run)
            elif event["event"] == "end":
                open_runs.discard(run)
        return {uuid.UUID(job_id) for job_id, _ in open_runs}

    def object_count(self, job_id: uuid.UUID) -> int:
        """Objects stored under the job's prefix."""
        root = Path(urlsplit(self.settings.effective_storage_url).path) / "jobs" / str(job_id)
        return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


@pytest.fixture
async def make_cluster(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    """Builds a cluster with these settings overrides; kills its workers afterwards."""
    clusters: list[Cluster] = []

    async def make(**overrides: Any) -> Cluster:
        settings = make_settings(pipelines=TEST_PIPELINES, **overrides)
        workdir = tmp_path / f"cluster-{len(clusters)}"
        workdir.mkdir()
        cluster = Cluster(settings, await Runtime.start(settings), workdir)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.kill_all()
        await cluster.runtime.close()
        # Shown by pytest only when the test failed.
        for worker in cluster.workers:
            print(f"--- {worker.log_path.name} (exit {worker.process.returncode})")
            print(worker.output()[-4000:])


# -- item 1: kill -9 chaos ----------------------------------------------------------


@pytest.mark.slow
async def test_kill_9_chaos_loses_nothing_and_bounds_duplicates(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """kill -9 two workers and SIGTERM two mid-run: 0 lost, 0 stuck, duplicates ≤ in flight."""
    # The replacements start after the kill; a stall threshold of 6 s (drain 2 s + two
    # heartbeats of 0.5 s + margin) lets them come up and sweep before it passes.
    cluster = await make_cluster(worker_concurrency=2, **{**FAST_TIMINGS, "stall_threshold_s": 6.0})
    settings = cluster.settings
    originals = [cluster.start_worker() for _ in range(4)]
    await cluster.ready(*originals)
    job_ids = [
        await cluster.submit("sleep", seconds=0.6 + (i % 7) * 0.1, tag=f"chaos-{i}")
        for i in range(40)
    ]
    victims, drained = originals[:2], originals[2:]

    async def mid_run() -> bool:
        done = sum(s == "succeeded" for s in (await cluster.statuses(job_ids)).values())
        return done >= 8 and all(cluster.in_flight(v.process.pid) for v in victims)

    await wait_until(mid_run, 30, what="mid-run, both victims running a job", interval_s=0.01)
    for victim in victims:
        victim.signal(signal.SIGKILL)
    for worker in drained:
        worker.signal(signal.SIGTERM)
    killed_at = time.monotonic()
    replacements = [cluster.start_worker() for _ in range(2)]
    for victim in victims:
        assert await cluster.exited(victim, 5) == -signal.SIGKILL
    killed_pids = {v.process.pid for v in victims}

    # Jobs in flight at the kill: an execution started in a killed process, no outcome yet.
    statuses = await cluster.statuses(job_ids)
    in_flight = {
        job_id
        for job_id, runs in cluster.starts().items()
        if runs[-1]["pid"] in killed_pids and statuses[job_id] not in FINAL
    }
    assert in_flight, "the kill hit no running job: the test proved nothing"
    dead_workers = [
        row.worker_id
        for row in await cluster.rows(
            "SELECT q.worker_id FROM procrastinate_jobs q JOIN jobs j ON j.queue_job_id = q.id "
            "WHERE j.id = ANY(:ids) AND q.status = 'doing'",
            ids=list(in_flight),
        )
    ]

    for worker in drained:
        exit_budget_s = settings.drain_timeout_s + 5 - (time.monotonic() - killed_at)
        assert await cluster.exited(worker, exit_budget_s) == 0
    await cluster.ready(replacements[0])
    sweeper_up_s = time.monotonic() - killed_at
    await cluster.ready(*replacements[1:])

    # Nothing is left running on a dead worker after the stall threshold plus one
    # sweep, counted from when a sweeper is up (on a loaded machine the
    # replacements can take longer than the threshold to start).
    async def held_by_the_dead() -> bool:
        count = await cluster.value(
            "SELECT count(*) FROM procrastinate_jobs "
            "WHERE status = 'doing' AND (worker_id IS NULL OR worker_id = ANY(:dead))",
            dead=dead_workers,
        )
        return int(count) == 0

    bound_s = max(settings.stall_threshold_s, sweeper_up_s) + settings.sweep_interval_s + 1.5
    await wait_until(
        held_by_the_dead,
        bound_s - (time.monotonic() - killed_at),
        what=f"jobs of killed workers handed back (a sweeper up after {sweeper_up_s:.1f} s)",
    )
    handed_back_s = time.monotonic() - killed_at

    await wait_until(lambda: cluster.all_final(job_ids), 60, what="all 40 jobs final")
    final = await cluster.statuses(job_ids)
    assert sorted(set(final.values())) == ["succeeded"], final
    assert await cluster.value("SELECT count(*) FROM jobs WHERE status = 'running'") == 0
    assert (
        await cluster.value("SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'") == 0
    )

    starts = cluster.starts()
    assert set(starts) == set(job_ids)
    duplicated = {job_id: len(runs) - 1 for job_id, runs in starts.items() if len(runs) > 1}
    assert set(duplicated) <= in_flight, (duplicated, in_flight)
    assert sum(duplicated.values()) <= len(in_flight)
    print(
        f"chaos: {len(in_flight)} jobs in flight on the killed workers, "
        f"{sum(duplicated.values())} duplicate executions, a replacement sweeping after "
        f"{sweeper_up_s:.2f} s, jobs handed back {handed_back_s:.2f} s after the kill"
    )


@pytest.mark.slow
async def test_sigterm_only_drains_without_duplicates(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """SIGTERM every worker mid-run (drain longer than any job): 0 duplicates, 0 lost."""
    cluster = await make_cluster(worker_concurrency=2, **FAST_TIMINGS)
    originals = [cluster.start_worker() for _ in range(2)]
    await cluster.ready(*originals)
    job_ids = [
        await cluster.submit("sleep", seconds=0.5 + (i % 5) * 0.15, tag=f"term-{i}")
        for i in range(16)
    ]
    await wait_until(
        lambda: all(cluster.in_flight(w.process.pid) for w in originals),
        15,
        what="both workers run a job",
        interval_s=0.01,
    )

    signalled_at = time.time()
    for worker in originals:
        worker.signal(signal.SIGTERM)
    replacement = cluster.start_worker()
    for worker in originals:
        assert await cluster.exited(worker, cluster.settings.drain_timeout_s + 5) == 0
    await cluster.ready(replacement)

    await wait_until(lambda: cluster.all_final(job_ids), 60, what="all jobs final")
    assert set((await cluster.statuses(job_ids)).values()) == {"succeeded"}
    starts = cluster.starts()
    assert {job_id: len(runs) for job_id, runs in starts.items()} == dict.fromkeys(job_ids, 1)
    # The drain did finish work in flight (the test proves something).
    drained_pids = {w.process.pid for w in originals}
    assert any(
        e["event"] == "end" and e["pid"] in drained_pids and e["t"] > signalled_at
        for e in read_journal(cluster.journal)
    )


# -- item 2: poison pill ------------------------------------------------------------


@pytest.mark.slow
async def test_poison_pill_runs_max_attempts_times_then_fails(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """A job that kills its worker runs exactly max_attempts times, then fails; no loop."""
    cluster = await make_cluster(worker_concurrency=1, max_attempts=3, **QUICK_TIMINGS)
    pool = [cluster.start_worker() for _ in range(2)]
    await cluster.ready(*pool)
    poison = await cluster.submit("suicide")

    deaths: list[int] = []
    budget_s = 3 * (QUICK_TIMINGS["stall_threshold_s"] + FETCH_POLL_S + 6) + 10

    async def supervise() -> bool:
        """Restart dead workers, as an orchestrator would; True once the job is final."""
        for index, worker in enumerate(pool):
            if worker.process.poll() is not None:
                deaths.append(worker.process.returncode)
                pool[index] = cluster.start_worker()
        return await cluster.status(poison) in FINAL

    await wait_until(supervise, budget_s, what="the poison pill parked")

    job = await cluster.runtime.jobs.get(poison, owner=None)
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert job.error.code == "too_many_attempts"
    assert "3 attempts" in job.error.message
    assert job.attempts == 4  # three that died, the fourth that parked it
    runs = cluster.starts()[poison]
    assert [run["attempt"] for run in runs] == [1, 2, 3]
    assert len({run["pid"] for run in runs}) == 3
    assert deaths == [-signal.SIGKILL] * 3

    # It never comes back: the queue moves on and the pill stays parked.
    await cluster.ready(*pool)
    canary = await cluster.submit("sleep", seconds=0.05, tag="canary")
    await wait_until(lambda: cluster.all_final([canary]), 30, what="a later job ran")
    assert await cluster.status(canary) == "succeeded"
    assert len(cluster.starts()[poison]) == 3
    assert await cluster.queue_status(poison) not in ("todo", "doing")
    assert all(worker.process.poll() is None for worker in pool)


# -- item 3: a draining worker keeps its job ----------------------------------------


@pytest.mark.slow
async def test_draining_worker_keeps_a_job_longer_than_the_stall_threshold(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """A job longer than the stall threshold, SIGTERM near its end, a sweeper beside: runs once."""
    timings = {**FAST_TIMINGS, "drain_timeout_s": 2.5}  # 4 s > 2.5 s + 2 x 0.5 s
    cluster = await make_cluster(worker_concurrency=1, **timings)
    settings = cluster.settings
    job_s = settings.stall_threshold_s + 2.0
    owner = cluster.start_worker()
    await cluster.ready(owner)
    job_id = await cluster.submit("sleep", seconds=job_s, tag="long")
    started = await wait_until(
        lambda: cluster.starts().get(job_id), 10, what="the long job started", interval_s=0.01
    )
    sweeper = cluster.start_worker()
    await cluster.ready(sweeper)

    # SIGTERM when less than the drain timeout is left: the job may finish in the drain.
    sigterm_at = started[0]["t"] + job_s - settings.drain_timeout_s + 0.5
    await wait_until(lambda: time.time() >= sigterm_at, job_s, what="the SIGTERM moment")
    assert await cluster.status(job_id) == "running"
    owner.signal(signal.SIGTERM)

    assert await cluster.exited(owner, settings.drain_timeout_s + 5) == 0
    assert await cluster.status(job_id) == "succeeded"
    runs = cluster.starts()[job_id]
    assert len(runs) == 1
    assert runs[0]["pid"] == owner.process.pid
    assert "stalled_jobs_recovered" not in sweeper.output()


# -- item 4: restart in place -------------------------------------------------------


@pytest.mark.slow
async def test_worker_killed_and_restarted_recovers_its_stalled_job(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """kill -9 the only worker mid-job and start it again: the job completes, effects once."""
    cluster = await make_cluster(worker_concurrency=1, **QUICK_TIMINGS)
    worker = cluster.start_worker()
    await cluster.ready(worker)
    job_input = ArtifactInput(text="recovered once", copies=5, linger_s=1.5)
    job_id = await cluster.submit("artifact", **job_input.model_dump(exclude={"journal"}))
    await wait_until(
        lambda: any(
            e["event"] == "artifact" and e["job_id"] == str(job_id)
            for e in read_journal(cluster.journal)
        ),
        15,
        what="the artifact written",
        interval_s=0.01,
    )

    worker.kill()
    killed_at = time.monotonic()
    restarted = cluster.start_worker()  # same host, same command
    await wait_until(lambda: cluster.all_final([job_id]), 30, what="the job recovered")
    recovered_s = time.monotonic() - killed_at

    assert await cluster.status(job_id) == "succeeded"
    runs = cluster.starts()[job_id]
    assert [(run["pid"], run["attempt"]) for run in runs] == [
        (worker.process.pid, 1),
        (restarted.process.pid, 2),
    ]
    artifacts = await cluster.rows(
        "SELECT name, storage_key, size FROM artifacts WHERE job_id = :id", id=job_id
    )
    body = artifact_body(job_input)
    assert [(a.name, a.storage_key, a.size) for a in artifacts] == [
        ("out.txt", f"jobs/{job_id}/out.txt", len(body))
    ]
    assert cluster.object_count(job_id) == 1
    usage = await cluster.rows(
        "SELECT prompt_tokens, completion_tokens FROM usage WHERE job_id = :id", id=job_id
    )
    expected = artifact_usage(job_input)
    assert [tuple(u) for u in usage] == [(expected.prompt_tokens, expected.completion_tokens)]
    print(f"restart in place: job recovered and finished {recovered_s:.2f} s after the kill")


# -- item 7: crash between the job row and the queue entry --------------------------

CRASHING_SUBMIT = """
import asyncio, os, signal, sys, json
from forgeline.jobs import queue
from forgeline.runtime import Runtime
from forgeline.settings import get_settings

real_defer = queue.defer
where = sys.argv[3]

async def defer_then_die(app, job_id, connection):
    if where == "after_defer":
        await real_defer(app, job_id, connection)
    print(job_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

async def main():
    runtime = await Runtime.start(get_settings())
    queue.defer = defer_then_die
    await runtime.jobs.submit(
        owner=None, pipeline="sleep", job_input=json.loads(sys.argv[1]), idempotency_key=sys.argv[2]
    )

asyncio.run(main())
"""


@pytest.mark.parametrize("where", ["before_defer", "after_defer"])
async def test_crash_inside_submit_leaves_nothing_and_the_retry_runs_once(
    make_cluster: Callable[..., Awaitable[Cluster]], where: str
) -> None:
    """kill -9 inside submit leaves no job and no queue entry; the keyed retry runs once."""
    cluster = await make_cluster(**FAST_TIMINGS)
    script = cluster.workdir / "crashing_submit.py"
    script.write_text(CRASHING_SUBMIT)
    job_input = {"seconds": 0.05, "journal": str(cluster.journal), "tag": "crash"}
    key = f"crash-{where}"
    crashed = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        json.dumps(job_input),
        key,
        where,
        env=cluster.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(crashed.communicate(), timeout=60)
    assert crashed.returncode == -signal.SIGKILL, stderr.decode()
    lost_id = uuid.UUID(stdout.decode().strip())  # printed with the row (and entry) written

    # The server rolls the dead client's transaction back: no half-accepted job.
    await wait_until(
        lambda: cluster.value(
            "SELECT count(*) = 0 FROM pg_stat_activity "
            "WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
        ),
        10,
        what="the crashed transaction ended",
    )
    assert await cluster.value("SELECT count(*) FROM jobs") == 0
    assert await cluster.value("SELECT count(*) FROM jobs WHERE id = :id", id=lost_id) == 0
    assert await cluster.value("SELECT count(*) FROM procrastinate_jobs") == 0

    retried = await cluster.runtime.jobs.submit(
        owner=None, pipeline="sleep", job_input=job_input, idempotency_key=key
    )
    assert retried.created
    stop = asyncio.Event()
    worker = asyncio.create_task(cluster.runtime.run_worker(stop))
    try:
        await wait_until(lambda: cluster.all_final([retried.job.id]), 15, what="the retry ran")
    finally:
        stop.set()
        await worker
    again = await cluster.runtime.jobs.submit(
        owner=None, pipeline="sleep", job_input=job_input, idempotency_key=key
    )
    assert not again.created
    assert again.job.id == retried.job.id
    assert again.job.status is JobStatus.SUCCEEDED
    assert {job_id: len(runs) for job_id, runs in cluster.starts().items()} == {retried.job.id: 1}


# -- cancellation -------------------------------------------------------------------


async def test_cancel_of_a_queued_job_is_immediate_and_it_never_runs(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """A queued job cancels at once; a worker started afterwards never runs it."""
    cluster = await make_cluster(**FAST_TIMINGS)
    job_id = await cluster.submit("sleep", seconds=0.05, tag="doomed")

    cancelled = await cluster.runtime.jobs.cancel(job_id, owner=None)

    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.finished_at is not None
    assert await cluster.queue_status(job_id) == "cancelled"
    worker = cluster.start_worker()
    await cluster.ready(worker)
    canary = await cluster.submit("sleep", seconds=0.05, tag="canary")
    await wait_until(lambda: cluster.all_final([canary]), 20, what="the canary ran")
    assert await cluster.status(canary) == "succeeded"
    assert await cluster.status(job_id) == "cancelled"
    assert job_id not in cluster.starts()
    assert (await cluster.runtime.jobs.get(job_id, owner=None)).attempts == 0


async def test_cancel_of_a_running_job_lands_within_a_second(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """A running cooperative job reaches ``cancelled`` within ~1 s of cancel, and stays so."""
    cluster = await make_cluster(**FAST_TIMINGS)
    worker = cluster.start_worker()
    await cluster.ready(worker)
    job_id = await cluster.submit("sleep", seconds=60, tag="long")
    await wait_until(
        lambda: cluster.starts().get(job_id), 15, what="the job started", interval_s=0.01
    )

    asked_at = time.monotonic()
    await cluster.runtime.jobs.cancel(job_id, owner=None)
    await wait_until(
        lambda: _has_status(cluster, job_id, "cancelled"), 5, what="cancelled", interval_s=0.01
    )
    latency_s = time.monotonic() - asked_at

    print(f"cancel of a running job: {latency_s * 1000:.0f} ms")
    assert latency_s < 1.5
    assert await cluster.queue_status(job_id) not in ("todo", "doing")
    assert [e["event"] for e in read_journal(cluster.journal)] == ["start"]  # it never ended
    assert worker.process.poll() is None


async def _has_status(cluster: Cluster, job_id: uuid.UUID, status: str) -> bool:
    return await cluster.status(job_id) == status


@pytest.mark.slow
async def test_cancel_while_the_worker_is_dead_settles_at_recovery(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """A running job cancelled after its worker died ends cancelled and never runs again."""
    cluster = await make_cluster(worker_concurrency=1, **QUICK_TIMINGS)
    worker = cluster.start_worker()
    await cluster.ready(worker)
    job_id = await cluster.submit("sleep", seconds=60, tag="orphan")
    await wait_until(lambda: cluster.starts().get(job_id), 15, what="started", interval_s=0.01)
    worker.kill()

    await cluster.runtime.jobs.cancel(job_id, owner=None)
    assert await cluster.status(job_id) == "running"  # only its worker could stop it
    survivor = cluster.start_worker()
    await cluster.ready(survivor)
    bound_s = QUICK_TIMINGS["stall_threshold_s"] + QUICK_TIMINGS["sweep_interval_s"] + 5
    await wait_until(lambda: _has_status(cluster, job_id, "cancelled"), bound_s, what="cancelled")
    canary = await cluster.submit("sleep", seconds=0.05, tag="canary")
    await wait_until(lambda: cluster.all_final([canary]), 20, what="the canary ran")
    assert len(cluster.starts()[job_id]) == 1


async def test_cancel_of_a_finished_job_is_a_conflict(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """Cancelling a finished job raises ConflictError in the service and is 409 at the API."""
    cluster = await make_cluster(**FAST_TIMINGS)
    admin = await cluster.runtime.keys.authenticate(ADMIN_KEY)
    assert admin is not None
    submitted = await cluster.runtime.jobs.submit(
        owner=admin.owner, pipeline="echo", job_input={"text": "done"}
    )
    job_id = submitted.job.id
    stop = asyncio.Event()
    worker = asyncio.create_task(cluster.runtime.run_worker(stop))
    try:
        await wait_until(lambda: cluster.all_final([job_id]), 15, what="the job ran")
    finally:
        stop.set()
        await worker
    assert await cluster.status(job_id) == "succeeded"

    with pytest.raises(ConflictError, match="already succeeded"):
        await cluster.runtime.jobs.cancel(job_id, owner=admin.owner)
    app = create_app(cluster.settings, runtime=cluster.runtime)
    async with httpx.AsyncClient(
        headers=AUTH, transport=httpx.ASGITransport(app=app), base_url="http://forgeline.test"
    ) as client:
        response = await client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    assert await cluster.status(job_id) == "succeeded"


# -- the stall sweep against itself -------------------------------------------------


async def test_a_late_sweeper_does_not_requeue_a_job_a_live_worker_took_back(
    make_cluster: Callable[..., Awaitable[Cluster]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sweeps racing: the slower one must not hand back a job already running again."""
    cluster = await make_cluster(**FAST_TIMINGS)
    app = cluster.runtime.queue_app
    manager = app.job_manager
    job_id = await cluster.submit("sleep", seconds=1, tag="raced")
    dead = await manager.register_worker()
    assert await manager.fetch_job(queues=[queue.QUEUE_NAME], worker_id=dead) is not None
    async with cluster.runtime.sessions.begin() as session:
        await session.execute(
            text(
                "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' "
                "WHERE id = :id"
            ),
            {"id": dead},
        )
    live = await manager.register_worker()
    real_get = manager.get_stalled_jobs
    interleaved = False

    async def slow_sweeper_read(**kwargs: Any) -> Any:
        nonlocal interleaved
        snapshot = await real_get(**kwargs)
        if not interleaved:
            interleaved = True
            # Between this sweeper's read and its writes: another sweeper hands the
            # job back, and a live worker takes it again.
            assert await cluster.runtime.jobs.recover_stalled(stall_threshold_s=4.0)
            assert await manager.fetch_job(queues=[queue.QUEUE_NAME], worker_id=live)
        return snapshot

    monkeypatch.setattr(manager, "get_stalled_jobs", slow_sweeper_read)
    late = await cluster.runtime.jobs.recover_stalled(stall_threshold_s=4.0)

    row = (
        await cluster.rows(
            "SELECT q.status, q.worker_id FROM procrastinate_jobs q "
            "JOIN jobs j ON j.queue_job_id = q.id WHERE j.id = :id",
            id=job_id,
        )
    )[0]
    assert (row.status, row.worker_id) == ("doing", live)
    assert late == []


async def test_a_job_restarted_during_the_sweep_still_reads_running(
    make_cluster: Callable[..., Awaitable[Cluster]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job a live worker starts again right after the sweep hands it back reads 'running'."""
    cluster = await make_cluster(**FAST_TIMINGS)
    runtime = cluster.runtime
    manager = runtime.queue_app.job_manager
    job_id = await cluster.submit("sleep", seconds=1, tag="restarted")
    dead = await manager.register_worker()
    assert await manager.fetch_job(queues=[queue.QUEUE_NAME], worker_id=dead) is not None
    assert await runtime.runner._start_attempt(job_id) is not None  # attempt 1, then death
    async with runtime.sessions.begin() as session:
        await session.execute(
            text(
                "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' "
                "WHERE id = :id"
            ),
            {"id": dead},
        )
    live = await manager.register_worker()
    real_prune = manager.prune_stalled_workers

    async def restart_then_prune(seconds_since_heartbeat: float) -> Any:
        # The job is back in the queue; a live worker polls right now, takes it and
        # starts attempt 2 before the sweep has finished.
        assert await manager.fetch_job(queues=[queue.QUEUE_NAME], worker_id=live)
        assert await runtime.runner._start_attempt(job_id) is not None
        return await real_prune(seconds_since_heartbeat)

    monkeypatch.setattr(manager, "prune_stalled_workers", restart_then_prune)
    assert await runtime.jobs.recover_stalled(stall_threshold_s=4.0) == [job_id]
    await runtime.runner.set_progress(job_id, 0.5)

    job = await runtime.jobs.get(job_id, owner=None)
    assert (job.status, job.attempts, job.progress) == (JobStatus.RUNNING, 2, 0.5)


@dataclass
class UserAbort:
    """Stands for Procrastinate's job context once the user asked to abort the job."""

    def abort_reason(self) -> AbortReason:
        """The abort came from a user's cancel."""
        return AbortReason.USER_REQUEST


async def test_cancel_landing_as_the_attempt_starts_still_ends_the_job(
    make_cluster: Callable[..., Awaitable[Cluster]],
) -> None:
    """A user abort reaching the runner while it records the attempt still ends the job."""
    cluster = await make_cluster(**FAST_TIMINGS)
    manager = cluster.runtime.queue_app.job_manager
    job_id = await cluster.submit("sleep", seconds=30, tag="raced")
    worker_id = await manager.register_worker()
    taken = await manager.fetch_job(queues=[queue.QUEUE_NAME], worker_id=worker_id)
    assert taken is not None
    # Picked up but not started: the cancel takes the running-job path.
    await cluster.runtime.jobs.cancel(job_id, owner=None)

    # Procrastinate cancels the job's task on the abort request; here it lands
    # at the runner's first await, inside _start_attempt.
    run = asyncio.create_task(cluster.runtime.runner.run(UserAbort(), str(job_id)))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    # What Procrastinate's worker does next: the retry strategy hands the job
    # back, and the abort flag turns that into a final "failed" entry.
    await manager.retry_job(taken)
    assert await cluster.queue_status(job_id) == "failed"
    await cluster.runtime.jobs.recover_stalled(stall_threshold_s=cluster.settings.stall_threshold_s)

    assert await cluster.status(job_id) == "cancelled"
