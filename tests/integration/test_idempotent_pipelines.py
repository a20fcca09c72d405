"""Every pipeline run twice for one job leaves what one run leaves (RELIABILITY.md item 6).

Delivery is at least once, so the job runner may run a job's pipeline again:
after a worker died between the pipeline's side effects and the final write,
when a stall sweep hands back a job that was only slow, or when a duplicate
delivery arrives after the job finished. These tests drive ``JobRunner.run``
directly on a real database and real (file) storage, with a fake model backend,
and compare a job delivered twice with a job delivered once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select

from forgeline.db.tables import ArtifactRow, JobRow, UsageRow
from forgeline.jobs.models import JobStatus
from forgeline.jobs.runner import JobRunner
from forgeline.runtime import Runtime
from forgeline.settings import Settings
from forgeline.storage import artifact_key
from forgeline.testing import FakeBackend

#: Each pipeline under test, with an input that exercises its side effects.
CASES: dict[str, dict[str, Any]] = {
    "story": {"prompt": "a lighthouse keeper who collects echoes", "max_tokens": 64, "seed": 7},
    "echo": {"text": "the same words, twice"},
    "artifact": {"text": "forged twice, stored once", "copies": 4},
}


class WorkerDied(BaseException):
    """Stands for a ``kill -9``: nothing in the runner catches it."""


@dataclass
class Delivery:
    """Stands for Procrastinate's job context: a delivery nobody asked to abort."""

    def abort_reason(self) -> None:
        """No abort was requested."""


@dataclass(frozen=True)
class Outcome:
    """Everything a job left behind, minus what necessarily differs between jobs."""

    status: str
    result: dict[str, Any] | None
    progress: float
    error: tuple[str | None, str | None]
    artifacts: tuple[tuple[str, str, int, str, bytes], ...]
    usage: tuple[tuple[int, int], ...]
    objects: tuple[str, ...]


@pytest.fixture
async def idem_runtime(make_settings: Callable[..., Settings]) -> AsyncIterator[Runtime]:
    """A runtime whose registry also holds the artifact-writing test pipeline."""
    started = await Runtime.start(
        make_settings(pipelines=["tests.support.pipelines:ArtifactPipeline"])
    )
    yield started
    await started.close()


def make_runner(runtime: Runtime, *, delay_s: float = 0.0) -> JobRunner:
    """A job runner on the runtime's database and storage, with a fake model backend."""
    return JobRunner(
        sessions=runtime.sessions,
        pipelines=runtime.pipelines,
        backends={"fake": FakeBackend(delay_s=delay_s)},
        default_backend="fake",
        storage=runtime.storage,
        retry_backoff_s=0.0,
    )


def make_dying_runner(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> JobRunner:
    """A runner whose process 'dies' after the pipeline ran, before the outcome is written."""
    runner = make_runner(runtime)

    async def die(*args: object) -> None:
        raise WorkerDied

    monkeypatch.setattr(runner, "_write_final", die)
    return runner


def stored_objects(runtime: Runtime, job_id: uuid.UUID) -> tuple[str, ...]:
    """Keys of the objects under the job's prefix in the (file) storage."""
    root = Path(urlsplit(runtime.settings.effective_storage_url).path)
    prefix = root / "jobs" / str(job_id)
    if not prefix.exists():
        return ()
    return tuple(sorted(p.relative_to(root).as_posix() for p in prefix.rglob("*") if p.is_file()))


async def outcome(runtime: Runtime, job_id: uuid.UUID) -> Outcome:
    """What the job left in the database and in storage."""
    async with runtime.sessions() as session:
        row = await session.get(JobRow, job_id, populate_existing=True)
        assert row is not None
        artifact_rows = (
            await session.scalars(
                select(ArtifactRow).where(ArtifactRow.job_id == job_id).order_by(ArtifactRow.name)
            )
        ).all()
        usage_rows = (
            await session.scalars(select(UsageRow).where(UsageRow.job_id == job_id))
        ).all()
    artifacts = []
    for artifact in artifact_rows:
        assert artifact.storage_key == artifact_key(job_id, artifact.name)
        body = b"".join([chunk async for chunk in runtime.storage.open(artifact.storage_key)])
        artifacts.append(
            (artifact.name, artifact.storage_key, artifact.size, artifact.content_type, body)
        )
    return Outcome(
        status=row.status,
        result=row.result,
        progress=row.progress,
        error=(row.error_code, row.error_message),
        artifacts=tuple(artifacts),
        usage=tuple((u.prompt_tokens, u.completion_tokens) for u in usage_rows),
        objects=stored_objects(runtime, job_id),
    )


def comparable(found: Outcome, job_id: uuid.UUID) -> Outcome:
    """The outcome with the job's own id taken out of keys, to compare two jobs."""
    prefix = f"jobs/{job_id}/"
    return Outcome(
        status=found.status,
        result=found.result,
        progress=found.progress,
        error=found.error,
        artifacts=tuple(
            (name, key.removeprefix(prefix), size, kind, body)
            for name, key, size, kind, body in found.artifacts
        ),
        usage=found.usage,
        objects=tuple(key.removeprefix(prefix) for key in found.objects),
    )


async def attempts_of(runtime: Runtime, job_id: uuid.UUID) -> int:
    """The job's attempt counter."""
    async with runtime.sessions() as session:
        attempts = await session.scalar(select(JobRow.attempts).where(JobRow.id == job_id))
    assert attempts is not None
    return attempts


async def submit(runtime: Runtime, pipeline: str, tag: str) -> uuid.UUID:
    """Store and queue one job of ``pipeline`` with the case's input."""
    job_input = dict(CASES[pipeline])
    # Distinct idempotency keys: two jobs with the same input, not one job twice.
    submission = await runtime.jobs.submit(
        owner="tenant-a", pipeline=pipeline, job_input=job_input, idempotency_key=tag
    )
    return submission.job.id


async def reference_outcome(runtime: Runtime, pipeline: str) -> Outcome:
    """The outcome of a job of ``pipeline`` delivered exactly once."""
    job_id = await submit(runtime, pipeline, "reference")
    await make_runner(runtime).run(Delivery(), str(job_id))  # type: ignore[arg-type]
    found = await outcome(runtime, job_id)
    assert found.status == JobStatus.SUCCEEDED.value, found
    assert len(found.usage) == 1
    assert len(found.objects) == len(found.artifacts)
    return comparable(found, job_id)


@pytest.mark.parametrize("pipeline", sorted(CASES))
async def test_redelivery_after_success_changes_nothing(
    idem_runtime: Runtime, pipeline: str
) -> None:
    """A duplicate delivery of a finished job runs nothing and changes nothing."""
    job_id = await submit(idem_runtime, pipeline, "twice")
    await make_runner(idem_runtime).run(Delivery(), str(job_id))  # type: ignore[arg-type]
    first = await outcome(idem_runtime, job_id)
    async with idem_runtime.sessions() as session:
        before = await session.get(JobRow, job_id)
        assert before is not None
        stamps = (before.attempts, before.finished_at, before.updated_at)

    await make_runner(idem_runtime).run(Delivery(), str(job_id))  # type: ignore[arg-type]

    assert await outcome(idem_runtime, job_id) == first
    async with idem_runtime.sessions() as session:
        after = await session.get(JobRow, job_id, populate_existing=True)
        assert after is not None
        assert (after.attempts, after.finished_at, after.updated_at) == stamps
    assert first.status == JobStatus.SUCCEEDED.value
    assert len(first.usage) == 1


@pytest.mark.parametrize("pipeline", sorted(CASES))
async def test_rerun_after_crash_before_outcome_leaves_one_set_of_effects(
    idem_runtime: Runtime, pipeline: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline run again after a crash before the final write ends as if run once."""
    expected = await reference_outcome(idem_runtime, pipeline)
    job_id = await submit(idem_runtime, pipeline, "crashed")

    with pytest.raises(WorkerDied):
        await make_dying_runner(idem_runtime, monkeypatch).run(Delivery(), str(job_id))  # type: ignore[arg-type]
    half_done = await outcome(idem_runtime, job_id)
    assert half_done.status == JobStatus.RUNNING.value
    assert half_done.usage == ()  # usage is charged with the outcome, not before

    await make_runner(idem_runtime).run(Delivery(), str(job_id))  # type: ignore[arg-type]

    assert comparable(await outcome(idem_runtime, job_id), job_id) == expected
    assert await attempts_of(idem_runtime, job_id) == 2


@pytest.mark.parametrize("pipeline", sorted(CASES))
async def test_overlapping_deliveries_write_the_outcome_once(
    idem_runtime: Runtime, pipeline: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two deliveries of one job running at once leave one outcome and one usage charge."""
    expected = await reference_outcome(idem_runtime, pipeline)
    job_id = await submit(idem_runtime, pipeline, "overlap")
    # Both deliveries start their attempt before either runs the pipeline.
    both_started = asyncio.Barrier(2)
    runners = [make_runner(idem_runtime), make_runner(idem_runtime)]
    for runner in runners:
        start_attempt = runner._start_attempt

        async def start_then_meet(job: uuid.UUID, start: Any = start_attempt) -> Any:
            row = await start(job)
            await both_started.wait()
            return row

        monkeypatch.setattr(runner, "_start_attempt", start_then_meet)

    await asyncio.gather(*(r.run(Delivery(), str(job_id)) for r in runners))  # type: ignore[arg-type]

    assert comparable(await outcome(idem_runtime, job_id), job_id) == expected
    assert await attempts_of(idem_runtime, job_id) == 2


async def test_usage_is_charged_once_per_job(idem_runtime: Runtime) -> None:
    """Across every redelivery above, the usage table holds at most one row per job."""
    job_id = await submit(idem_runtime, "artifact", "charged")
    for _ in range(3):
        await make_runner(idem_runtime).run(Delivery(), str(job_id))  # type: ignore[arg-type]
    async with idem_runtime.sessions() as session:
        rows = await session.scalar(
            select(func.count()).select_from(UsageRow).where(UsageRow.job_id == job_id)
        )
    assert rows == 1
