"""The runbook's PostgreSQL backup and restore, run as written, get every job back."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from forgeline.events.log import read_events
from forgeline.jobs.models import JobStatus
from forgeline.runtime import Runtime
from forgeline.settings import Settings
from tests.deploy.conftest import repo_path
from tests.support.postgres import DatabaseFactory

BACKUP = repo_path("deploy", "backup", "backup-postgres.sh")
RESTORE = repo_path("deploy", "backup", "restore-postgres.sh")
OWNER = "backup-test"


def _script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False
    )


async def _finished_jobs(runtime: Runtime, count: int) -> list[uuid.UUID]:
    """Run ``count`` echo jobs to the end with a worker; returns their ids."""
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_worker(stop))
    try:
        ids = [
            (
                await runtime.jobs.submit(
                    owner=OWNER, pipeline="echo", job_input={"text": f"job {n}"}
                )
            ).job.id
            for n in range(count)
        ]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = [await runtime.jobs.get(job_id, owner=OWNER) for job_id in ids]
            if all(job.status.is_final for job in jobs):
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=30)
    return ids


@pytest.mark.slow
async def test_backup_and_restore_bring_back_jobs_results_and_event_logs(
    runtime: Runtime,
    databases: DatabaseFactory,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """Dump a live database, restore it into an empty one: same jobs, results and events."""
    ids = await _finished_jobs(runtime, 3)
    url = runtime.settings.database_url.get_secret_value()  # type: ignore[union-attr]
    dump = tmp_path / "backups" / "forgeline.dump"

    backup = await asyncio.to_thread(_script, BACKUP, url, dump)
    assert backup.returncode == 0, backup.stderr
    assert dump.stat().st_size > 0
    assert not dump.with_suffix(".dump.partial").exists()

    restored_name = f"fl_restored_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(databases.admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(restored_name)))
    restored_url = databases.url_of(restored_name)
    try:
        restore = await asyncio.to_thread(_script, RESTORE, dump, restored_url)
        assert restore.returncode == 0, restore.stderr
        assert restore.stdout.strip() == f"restored {dump}: 3 jobs"
        # A second restore onto the now-populated database is refused.
        again = await asyncio.to_thread(_script, RESTORE, dump, restored_url)
        assert again.returncode == 1
        assert "already has a jobs table" in again.stderr

        restored = await Runtime.start(make_settings(database_url=restored_url))
        try:
            for job_id in ids:
                before = await runtime.jobs.get(job_id, owner=OWNER)
                after = await restored.jobs.get(job_id, owner=OWNER)
                assert after.status is JobStatus.SUCCEEDED
                assert (after.result, after.owner, after.attempts) == (
                    before.result,
                    before.owner,
                    before.attempts,
                )
                async with runtime.sessions() as old, restored.sessions() as new:
                    assert await read_events(new, job_id) == await read_events(old, job_id)
        finally:
            await restored.close()
    finally:
        with psycopg.connect(databases.admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(restored_name)
                )
            )
