"""The queue: Procrastinate on the same PostgreSQL as the jobs table.

forgeline's ``jobs`` table is the source of truth for a job's state; the
Procrastinate job is only the delivery mechanism. One Procrastinate task,
``forgeline.run_job``, carries a job id. It is deferred on the caller's own
connection, inside the transaction that writes the job row, so a job is
either both stored and queued or neither.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

from procrastinate import App, PsycopgConnector, RetryDecision
from procrastinate.jobs import Job as QueueJob
from procrastinate.retry import BaseRetryStrategy
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

QUEUE_NAME = "forgeline"
#: Wait before delivering again a job whose delivery lost the database.
DATABASE_RETRY_DELAY_S = 5.0
TASK_NAME = "forgeline.run_job"
#: Longest the queue's pool keeps retrying one connection before starting over.
RECONNECT_TIMEOUT_S = 30.0
#: Longest wait for a connection of the queue's pool, failing over to an error.
POOL_WAIT_S = 5.0


class RetryLater(Exception):
    """Raised by the job runner to have Procrastinate deliver the job again."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(f"retry in {delay_s:g} s")
        self.delay_s = delay_s


class RunnerRetryStrategy(BaseRetryStrategy):
    """Retries exactly when the runner asks, and jobs interrupted by a shutdown.

    The runner counts attempts in the jobs table (a worker killed mid-job never
    reaches Procrastinate's counter), so it alone decides whether to retry.
    """

    def get_retry_decision(
        self, *, exception: BaseException, job: QueueJob
    ) -> RetryDecision | None:
        if isinstance(exception, RetryLater):
            return RetryDecision(
                retry_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=exception.delay_s)
            )
        if isinstance(exception, (OperationalError, InterfaceError)):
            # The database failed mid-delivery, so the job's state may not be
            # written: deliver again once it is back (attempts still count).
            return RetryDecision(
                retry_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=DATABASE_RETRY_DELAY_S)
            )
        if isinstance(exception, asyncio.CancelledError):
            # Procrastinate only asks about cancellations caused by its shutdown
            # (a user's abort is settled before retrying): hand the job back now.
            return RetryDecision(retry_in={"seconds": 0})
        return None


def create_queue_app(conninfo: str, *, pool_size: int = 10) -> App:
    """A Procrastinate app on ``conninfo``; open it with ``open_async`` before use."""
    connector = PsycopgConnector(
        conninfo=conninfo,
        min_size=1,
        max_size=pool_size,
        # psycopg_pool doubles its wait between reconnection attempts up to this
        # timeout (default 5 min): after a two-minute outage the next attempt
        # could be two minutes away. Giving up after 30 s and starting a fresh
        # series when a connection is next needed keeps the wait short.
        reconnect_timeout=RECONNECT_TIMEOUT_S,
        # The longest wait for a pooled connection (default 30 s). A stopping
        # worker unregisters itself through the pool in a step no cancellation
        # reaches; with the database down, this wait is what bounds its exit.
        timeout=POOL_WAIT_S,
    )
    return App(connector=connector)


async def defer(app: App, job_id: uuid.UUID, connection: Any) -> int:
    """Queue the run of ``job_id`` on ``connection`` (inside the caller's transaction)."""
    queued = await app.job_manager.defer_job_async(
        QueueJob(
            queue=QUEUE_NAME,
            lock=None,
            queueing_lock=None,
            task_name=TASK_NAME,
            task_kwargs={"job_id": str(job_id)},
        ),
        connection=connection,
    )
    if queued.id is None:  # Procrastinate always sets it; guard the type
        raise RuntimeError("procrastinate returned a job without an id")
    return queued.id


async def cancel(app: App, queue_job_id: int, connection: Any, *, abort: bool) -> bool:
    """Remove a waiting job from the queue, or ask a running one to stop (``abort``)."""
    return await app.job_manager.cancel_job_by_id_async(
        queue_job_id, abort=abort, connection=connection
    )


#: Hand a stalled job back, only if it is still the dead worker's: a sweeper
#: that read the stalled list late must not re-queue a job a live worker took.
#: A job whose abort was requested ends instead (as Procrastinate's retry does).
_HAND_BACK = text(
    """
    UPDATE procrastinate_jobs
       SET status = (CASE WHEN abort_requested THEN 'failed' ELSE 'todo' END)
                    ::procrastinate_job_status,
           attempts = attempts + (CASE WHEN abort_requested THEN 0 ELSE 1 END),
           scheduled_at = CASE WHEN abort_requested THEN scheduled_at ELSE now() END
     WHERE id = :queue_job_id AND status = 'doing'
       AND worker_id IS NOT DISTINCT FROM :worker_id
    RETURNING id
    """
)


async def find_stalled(app: App, *, stall_threshold_s: float) -> list[QueueJob]:
    """Running queue jobs of workers silent for ``stall_threshold_s``."""
    return list(await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stall_threshold_s))


async def hand_back(session: AsyncSession, queue_job: QueueJob) -> bool:
    """Return a stalled job to the queue in ``session``'s transaction; False if taken."""
    handed = await session.scalar(
        _HAND_BACK, {"queue_job_id": queue_job.id, "worker_id": queue_job.worker_id}
    )
    return handed is not None


async def prune_dead_workers(app: App, *, stall_threshold_s: float) -> None:
    """Forget workers silent for ``stall_threshold_s`` (their jobs were handed back)."""
    await app.job_manager.prune_stalled_workers(stall_threshold_s)
